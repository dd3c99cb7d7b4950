"""Metrics against hand counts: MACs of known layers, confusion matrices, latency bookkeeping."""
import warnings

import pytest
import torch
from torch import nn

from modhifi import nets
from modhifi.metrics import (channels_last, count_cost, evaluation_from, measure_latency,
                             optimise_for_inference)


def test_macs_of_known_layers_equal_the_hand_count():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)      # output 8 x 16 x 16
    linear = nn.Linear(8 * 16 * 16, 10)
    model = nn.Sequential(conv, nn.Flatten(), linear)
    cost = count_cost(model, (3, 32, 32))
    conv_macs, linear_macs = 8 * 16 * 16 * 3 * 3 * 3, 8 * 16 * 16 * 10
    assert cost.macs == conv_macs + linear_macs
    assert dict(cost.per_layer) == {"0": conv_macs, "2": linear_macs}
    assert cost.params == 8 * 3 * 9 + 8 * 16 * 16 * 10 + 10
    assert cost.to_frame()["share"].sum() == pytest.approx(1.0)


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention as torchvision's ViT calls it (fused kernel in inference)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


class _Scaled(nn.Module):
    def forward(self, q):  # (B, H, L, d): the same tensor as queries, keys and values
        return nn.functional.scaled_dot_product_attention(q, q, q)


def test_attention_kernels_count_their_matrix_products():
    """The kernels the flop counter has no formula for (the CPU's SDPA, the fused
    MultiheadAttention and TransformerEncoderLayer of inference) count as their hand count:
    projections, QKᵀ and AV, the feed-forward layers. (Counted 0 before: a ViT's attention
    vanished on the CPU, though not on a GPU.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from modhifi.metrics import ATTENTION_FLOPS

    batch, length, dim, heads, hidden = 2, 5, 16, 4, 24
    attention = 2 * batch * length * length * dim  # QKᵀ and AV, summed over the heads
    projections = 4 * batch * length * dim * dim  # q, k, v and the output
    encoder = nn.TransformerEncoderLayer(dim, heads, hidden, batch_first=True, dropout=0.0)
    cases = {
        "aten._scaled_dot_product_flash_attention_for_cpu":
            (_Scaled(), (heads, length, dim // heads), attention),
        "aten._native_multi_head_attention":
            (_SelfAttention(dim, heads), (length, dim), projections + attention),
        "aten._transformer_encoder_layer_fwd":
            (encoder, (length, dim), projections + attention + 2 * batch * length * dim * hidden),
    }
    for kernel, (model, shape, macs) in cases.items():
        model.eval()
        x = torch.randn(batch, *shape)
        assert count_cost(model, x).macs == macs, kernel
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter, \
                torch.inference_mode():
            model(x)  # the kernel under test is the one that ran
        assert kernel in {str(op) for op in counter.get_flop_counts()["Global"]}, kernel


def test_confusion_matrix_and_per_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    result = evaluation_from(predicted, labels, num_classes=3)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.per_class == (0.5, 1.0, 0.5)
    assert result.confusion == ((1, 1, 0), (0, 2, 0), (1, 0, 1))


def test_optimised_model_folds_batchnorm_and_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    fast = optimise_for_inference(model, x)
    assert "batch_norm" not in str(fast.graph)
    torch.testing.assert_close(fast(channels_last(x)), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [lambda: nets.ViT(dim=32, depth=2, heads=4, hidden=64),
                                   lambda: nets.ResNet(widths=(8, 16)),
                                   lambda: nets.vgg(stages=((8,), (16,))), nets.tiny_cnn],
                         ids=["vit", "resnet", "vgg", "tiny_cnn"])
def test_the_zoo_networks_are_timed_on_a_trace_that_follows_the_batch_size(build):
    """The optimised copy that latency is timed on is a TorchScript trace: no step of the zoo's
    networks may be frozen into it as a constant (the tracer warns where one is, e.g. a batch
    size read with len()), so it computes the model at another batch size too."""
    torch.manual_seed(0)
    model = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        fast = optimise_for_inference(model, torch.randn(4, 1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fast(channels_last(x)), model(x), rtol=1e-4, atol=1e-4)


def test_latency_records_its_settings(cpu):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    latency = measure_latency(model, (1, 8, 8), backend=cpu, batch_size=4, warmup=1, repeats=3)
    assert latency.batch_size == 4 and latency.threads == cpu.threads
    assert latency.eager.repeats == 3 and latency.eager.warmup == 1
    assert 0 < latency.optimised.p10_ms <= latency.optimised.median_ms <= latency.optimised.p90_ms


def test_layer_latency_books_each_layer_between_its_own_hooks(monkeypatch):
    """With a clock that ticks one second per reading, each layer call takes exactly one tick and
    a forward of L layers 2L + 1 ticks: the bookkeeping, not the machine's speed, is tested. A
    layer called twice in one forward counts twice; layers come in call order."""
    import itertools
    import time

    from modhifi.backend import choose_backend
    from modhifi.metrics import measure_layer_latency

    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 8), nn.ReLU(),
                          shared, shared)
    clock = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    timed = measure_layer_latency(model, (1, 6, 6), backend=choose_backend("cpu"), batch_size=2,
                                  warmup=1, repeats=3)
    assert [name for name, _ in timed.per_layer] == ["0", "2", "4"]
    assert dict(timed.per_layer) == {"0": 1e3, "2": 1e3, "4": 2e3}
    assert timed.forward_ms == (2 * 4 + 1) * 1e3


def test_timing_leaves_the_process_random_generator_alone(cpu):
    """Timing inputs come from a generator of their own: a session building a seeded model
    meanwhile (`training.seeded`) gets its weights, and nobody's draws are consumed."""
    from modhifi.prune import trace_structure
    from modhifi.prune.latency import measure_costs

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    measure_latency(model, (1, 12, 12), backend=cpu, batch_size=2, warmup=1, repeats=1)
    measure_costs(model, trace_structure(model, (1, 12, 12)), (1, 12, 12), backend=cpu,
                  batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
