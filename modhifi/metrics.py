"""Measurements of a model: accuracy (top-1, per class, confusion), MACs and parameters, latency.

MACs come from `torch.utils.flop_counter` (FLOPs / 2) for one input. Latency is timed the paper's
way (forward only, random input of the model's shape, warm-up, many repeats) both in eager mode
and on an inference-optimised copy (BatchNorm folded into convs, frozen TorchScript,
channels-last memory format), because
small models are dominated by Python overheads in eager mode.
"""
from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from modhifi.backend import Backend, Timing, time_side_by_side
from modhifi.batch import call, example_of
from modhifi.data import Split
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.hooks import hooked, private_copy, shared_copy


@dataclass(frozen=True)
class Evaluation:
    """Top-1 accuracy of a model on a split, overall and per class."""

    accuracy: float
    per_class: tuple[float, ...]
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class
    samples: int

    def to_frame(self, classes: tuple[str, ...]) -> pd.DataFrame:
        return pd.DataFrame({"class": classes, "accuracy": self.per_class})


def inference_copy(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An eval-mode copy for fast forward passes: BatchNorm folded into convs, channels-last.

    Same function as `model` up to float rounding; about 3× faster than eager NCHW on CPU for
    the zoo CNNs. A BatchNorm is folded into the Conv2d whose output it reads directly (seen in
    one recorded pass on `example`, no torch.fx: its tracer patches `nn.Module` for the whole
    process and breaks other threads' forward passes). The folded copy must reproduce the
    model's outputs on `example`; where it does not (a conv output read by something else
    too), the copy is returned unfolded.
    """
    copied, example = private_copy(model), example[:16]  # a few images tell the wiring
    convs = {n for n, m in copied.named_modules() if isinstance(m, nn.Conv2d)}
    norms = {n for n, m in copied.named_modules() if isinstance(m, nn.BatchNorm2d)}
    outputs: dict[str, list[torch.Tensor]] = {}   # conv -> its outputs in this pass
    inputs: dict[str, list[torch.Tensor]] = {}    # BatchNorm -> its inputs

    def output_of(name):
        return lambda module, args, out: outputs.setdefault(name, []).append(out)

    def input_of(name):
        return lambda module, args: inputs.setdefault(name, []).append(args[0])

    with torch.inference_mode(), hooked(copied, private=True,
                                        after={n: output_of(n) for n in convs},
                                        before={n: input_of(n) for n in norms}) as run:
        expected = run(example)
    made_by = {id(out[0]): conv for conv, out in outputs.items() if len(out) == 1}
    pairs = {norm: made_by[id(x[0])] for norm, x in inputs.items()
             if len(x) == 1 and id(x[0]) in made_by}
    for norm, conv in pairs.items():  # folded in place: the copy is ours
        _replace(copied, conv, fuse_conv_bn_eval(copied.get_submodule(conv),
                                                 copied.get_submodule(norm)))
        _replace(copied, norm, nn.Identity())
    if pairs:
        with torch.inference_mode():
            same = torch.allclose(copied(example), expected, rtol=1e-3,
                                  atol=1e-4 * float(expected.abs().max().clamp(min=1)))
        copied = copied if same else private_copy(model)  # rare: a conv output read twice
    return copied.to(memory_format=torch.channels_last)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@torch.inference_mode()
def predict(model: nn.Module, split: Split, *, device: torch.device,
            batch_size: int = 128) -> torch.Tensor:
    """Logits of every image of `split`, (N, num_classes), on the CPU."""
    batches = split.batches(batch_size, device=device)
    first = next(batches, None)
    if first is None:
        raise UserError("the split to evaluate is empty; it needs at least one image")
    fast = inference_copy(model, first)
    return torch.cat([fast(channels_last(x)).float().cpu() for x in itertools.chain([first], batches)])


def evaluate(model: nn.Module, split: Split, *, device: torch.device,
             num_classes: int, batch_size: int = 128, shard: Shard = ALONE) -> Evaluation:
    """Top-1, per-class accuracy and the confusion matrix on every image of `split` (this
    process's whole batches of it when several share it, their counts summed over all)."""
    if shard.world > 1:
        split = split.subset(shard.indices(len(split), batch_size))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    if len(split) or shard.world == 1:  # one process alone still refuses an empty split
        predicted = predict(model, split, device=device, batch_size=batch_size).argmax(1)
        confusion += _confusion(predicted, split.labels, num_classes).to(confusion)
    return _evaluation(shard.sum(confusion).long().cpu())


def evaluation_from(predicted: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> Evaluation:
    """Evaluation from predicted and true labels, both (N,)."""
    return _evaluation(_confusion(predicted, labels, num_classes))


def _confusion(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: rows true class, columns predicted class."""
    return torch.bincount(labels * num_classes + predicted,
                          minlength=num_classes ** 2).view(num_classes, num_classes)


def _evaluation(confusion: torch.Tensor) -> Evaluation:
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    samples = int(confusion.sum())
    return Evaluation(accuracy=int(confusion.diag().sum()) / max(samples, 1),
                      per_class=tuple(per_class.tolist()),
                      confusion=tuple(tuple(row) for row in confusion.tolist()),
                      samples=samples)


@dataclass(frozen=True)
class Cost:
    """MACs for one input and parameter count, in total and per layer."""

    macs: int
    params: int
    per_layer: tuple[tuple[str, int], ...]  # (module name, MACs) for layers that do work

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.per_layer, columns=["layer", "macs"])
        frame["share"] = frame["macs"] / max(self.macs, 1)
        return frame


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, which registers process-wide module hooks
    (every forward pass in every thread would enter them and scramble its attribution). Only
    the total is kept; per-layer MACs come from our own hooks on a copy."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args) -> None:
        pass


def count_cost(model: nn.Module, input_shape) -> Cost:
    """MACs (FLOPs / 2) of one forward pass on one sample, and parameters.

    `input_shape` is the shape of one input (zeros of (1, *input_shape) are fed) or a one-sample
    example of any form (`modhifi.batch`: a tensor, a tuple or a dict of tensors).

    A layer's MACs are the FLOPs counted while it runs (leaf modules only, so that a block's MACs
    are not counted again under its children).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    leaves = [name for name, module in model.named_modules()
              if name and next(module.children(), None) is None]
    (total, flops), = count_flops(model, [example_of(input_shape, device)], leaves)
    per_layer = tuple((name, int(flops[name] // 2)) for name in leaves if flops.get(name))
    return Cost(macs=int(total // 2), params=sum(p.numel() for p in model.parameters()),
                per_layer=per_layer)


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """F.scaled_dot_product_attention's CPU kernel: the counter's own SDPA formula."""
    return sdpa_flop_count(query, key, value)


def _multi_head_attention(query, key, value, embed_dim, num_head, *args, out_shape=None,
                          **kwargs) -> int:
    """nn.MultiheadAttention's fused inference kernel, (B, L, E) queries over (B, S, E) keys:
    the query, key, value and output projections, and the attention (SDPA's formula, the heads
    side by side: one head of width E counts the same)."""
    batch, (queries, width), keys = math.prod(query[:-2]), query[-2:], key[-2]
    projections = 2 * batch * width * width * (2 * queries + 2 * keys)
    return projections + sdpa_flop_count((batch, 1, queries, width), (batch, 1, keys, width),
                                         (batch, 1, keys, width))


def _encoder_layer(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                   use_gelu, norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2,
                   norm_bias_2, ffn_weight_1, *args, out_shape=None, **kwargs) -> int:
    """nn.TransformerEncoderLayer's fused inference kernel on (B, L, E): its self-attention and
    its two feed-forward layers (E -> F -> E, F = ffn_weight_1's rows)."""
    tokens = math.prod(src[:-1])
    feed_forward = 2 * 2 * tokens * src[-1] * ffn_weight_1[0]
    return _multi_head_attention(src, src, src, embed_dim, num_heads) + feed_forward


# The FLOPs of the attention kernels torch.utils.flop_counter has no formula for: without them
# a ViT's attention counted 0 on the CPU (and not on a GPU, whose kernels it knows), and
# torchvision's ViT-B/16 36% of its MACs.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                   torch.ops.aten._native_multi_head_attention: _multi_head_attention,
                   torch.ops.aten._transformer_encoder_layer_fwd: _encoder_layer}


def count_flops(model: nn.Module, batches, names) -> list[tuple[int, dict[str, int]]]:
    """FLOPs of one forward pass `call(model, batch)` per batch (`torch.utils.flop_counter`,
    with `ATTENTION_FLOPS`): the total, and each module in `names` (its children's included) by
    name. Counted on one hooked copy in this thread alone: `model` is only read, and other
    threads' passes never enter the count."""
    counted = []
    flops: dict[str, int] = {}
    started: dict[str, int] = {}

    def enter(name):
        return lambda module, args: started.__setitem__(name, counter.get_total_flops())

    def leave(name):
        return lambda module, args, out: flops.__setitem__(
            name, flops.get(name, 0) + counter.get_total_flops() - started[name])

    with hooked(model, before={n: enter(n) for n in names},
                after={n: leave(n) for n in names}) as run:
        for batch in batches:
            counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
            counter.mod_tracker = _GlobalOnly()  # thread-local counting: the dispatch mode alone
            with torch.inference_mode(), counter:
                call(run, batch)
            counted.append((counter.get_total_flops(), dict(flops)))
            flops.clear()
    return counted


@dataclass(frozen=True)
class Latency:
    """Forward latency of one batch, eager and inference-optimised."""

    batch_size: int
    threads: int
    device: str
    eager: Timing
    optimised: Timing


_TRACING = threading.Lock()


def optimise_for_inference(model: nn.Module, example: torch.Tensor, *,
                           nhwc: bool = True) -> torch.jit.ScriptModule:
    """A frozen TorchScript copy of `model`, BatchNorm folded into the convs.

    With `nhwc` (channels-last) oneDNN / cuDNN pick their fastest convolution kernels; call the
    result with `channels_last(x)`. `nhwc=False` is the plain NCHW export papers usually time.
    """
    model = private_copy(model)
    if nhwc:
        model, example = model.to(memory_format=torch.channels_last), channels_last(example)
    # The tracer keeps process-wide state (torch.jit's module map), so one trace at a time.
    with _TRACING, torch.inference_mode(False), torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(model, example))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in NHWC memory order (other ranks unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, backend: Backend,
                    batch_size: int = 64, warmup: int = 5, repeats: int = 30) -> Latency:
    """Median forward time of a random (batch_size, *input_shape) batch, eager and optimised."""
    return measure_latencies([model], input_shape, backend=backend, batch_size=batch_size,
                             warmup=warmup, repeats=repeats)[0]


def measure_latencies(models: list[nn.Module], input_shape: tuple[int, ...], *, backend: Backend,
                      batch_size: int = 64, warmup: int = 5, repeats: int = 30) -> list[Latency]:
    """Latency of several models timed in alternation (side by side), eager and optimised."""
    example = backend.random(batch_size, *input_shape)
    fast = channels_last(example)
    eager = [lambda m=shared_copy(model): m(example) for model in models]
    optimised = [lambda m=optimise_for_inference(model, example): m(fast) for model in models]
    with torch.no_grad():
        timings = time_side_by_side(backend, eager + optimised, warmup=warmup, repeats=repeats)
    n = len(models)
    return [Latency(batch_size, backend.threads, backend.description, timings[i], timings[n + i])
            for i in range(n)]


@dataclass(frozen=True)
class LayerLatency:
    """Where a forward pass spends its time: each Conv2d/Linear's median share, eager."""

    batch_size: int
    threads: int
    device: str
    forward_ms: float                          # median of the whole (hooked) forward
    per_layer: tuple[tuple[str, float], ...]   # (layer, median ms per forward), forward order
    repeats: int


def measure_layer_latency(model: nn.Module, input_shape: tuple[int, ...], *, backend: Backend,
                          batch_size: int = 64, warmup: int = 3,
                          repeats: int = 15) -> LayerLatency:
    """Each Conv2d/Linear layer's time inside an eager forward of a random batch (the device
    synchronised around it), the median over `repeats` forwards after `warmup`; a layer called
    twice in one forward counts both calls. Timed on a copy: `model` is only read."""
    example = backend.random(batch_size, *input_shape)
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Conv2d, nn.Linear))]
    spent: dict[str, list[float]] = {name: [] for name in names}  # per forward, in ms
    started: dict[str, float] = {}

    def enter(name):
        def hook(module, args):
            backend.synchronize()
            started[name] = time.perf_counter()
        return hook

    def leave(name):
        def hook(module, args, out):
            backend.synchronize()
            spent[name][-1] += (time.perf_counter() - started[name]) * 1e3
        return hook

    forwards = []
    with hooked(model, before={n: enter(n) for n in names},
                after={n: leave(n) for n in names}) as run, torch.no_grad():
        for _ in range(warmup + repeats):
            for times in spent.values():
                times.append(0.0)
            backend.synchronize()
            begin = time.perf_counter()
            run(example)
            backend.synchronize()
            forwards.append((time.perf_counter() - begin) * 1e3)
    called = [name for name in names if spent[name][-1] > 0]
    order = sorted(called, key=lambda name: started[name])
    return LayerLatency(batch_size, backend.threads, backend.description,
                        statistics.median(forwards[warmup:]),
                        tuple((name, statistics.median(spent[name][warmup:])) for name in order),
                        repeats)


@dataclass(frozen=True)
class Comparison:
    """A model before and after a modification, measured side by side in one run."""

    before: Evaluation
    after: Evaluation
    cost_before: Cost
    cost_after: Cost
    latency_before: Latency | None
    latency_after: Latency | None

    @property
    def speedup_macs(self) -> float:
        return self.cost_before.macs / max(self.cost_after.macs, 1)

    @property
    def speedup_measured(self) -> float | None:
        """Ratio of inference-optimised latencies (BatchNorm folded, frozen TorchScript)."""
        if self.latency_before is None:
            return None
        return self.latency_before.optimised.median_ms / self.latency_after.optimised.median_ms

    @property
    def speedup_eager(self) -> float | None:
        if self.latency_before is None:
            return None
        return self.latency_before.eager.median_ms / self.latency_after.eager.median_ms


def compare(before: nn.Module, after: nn.Module, *, dataset, backend: Backend,
            batch_size: int = 64, latency: bool = True, evaluation_before: Evaluation | None = None,
            repeats: int = 30, shard: Shard = ALONE) -> Comparison:
    """Accuracy on the full test split (shared by `shard`'s processes), MACs, params and
    (optionally) latency of two models."""
    def measure(model: nn.Module) -> Evaluation:
        return evaluate(model, dataset.test, device=backend.device, num_classes=dataset.num_classes,
                        shard=shard)

    latencies = (measure_latencies([before, after], dataset.input_shape, backend=backend,
                                   batch_size=batch_size, repeats=repeats) if latency else [None, None])
    return Comparison(evaluation_before or measure(before), measure(after),
                      count_cost(before, dataset.input_shape), count_cost(after, dataset.input_shape),
                      *latencies)
