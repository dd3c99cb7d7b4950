"""Oracles shared by the tests: explicit per-sample contributions (brute force), a snapshot of
everything a call could change on a model, to assert that it changed nothing, and a synthetic
latency cost model whose times are known in closed form; and the command line run in the
test's own process."""
import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from modhifi.prune.latency import CostModel, LayerTimes


def contributions(layer, x):
    """(N, c_out, c_in, L) explicit A_ci: the layer applied to input channel i alone, minus the bias.

    Zeroing the other channels (rather than unfolding) keeps this oracle independent of the
    implementation, padding modes included.
    """
    is_conv = isinstance(layer, nn.Conv2d)
    channel_axis = 1 if is_conv else -1
    bias_only = layer(torch.zeros_like(x))
    A = []
    for i in range(x.shape[channel_axis]):
        alone = torch.zeros_like(x)
        alone.select(channel_axis, i).copy_(x.select(channel_axis, i))
        y = layer(alone) - bias_only  # (N, c_out, H', W') or (N, [T,] c_out)
        A.append(y.flatten(2) if is_conv else y.reshape(len(x), -1, y.shape[-1]).transpose(1, 2))
    return torch.stack(A, dim=2)


@dataclasses.dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


# `prune --json`'s keys for every kind of model (shared/docs/contract.md)
PRUNE_KEYS = frozenset({
    "model", "method", "target", "target_kind", "allocation", "compensation", "bn_recalibrated",
    "calib_samples", "device", "accuracy_before", "accuracy_after", "macs_before", "macs_after",
    "params_before", "params_after", "channels_before", "channels_after", "batch_size",
    "latency_ms_before", "latency_ms_after", "speedup_macs", "speedup_measured", "speedup_eager",
    "seconds"})


@contextlib.contextmanager
def one_thread():
    """Torch on one thread inside the block (the thread count is the process's: put back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def command_line(capture, *args: str) -> Ran:
    """`python -m modhifi ARGS` run in this process (`main`), its output read by pytest's
    `capture` fixture (`capsys`, or `capfd` for the file descriptors): a fresh process costs
    seconds of imports (~7 s with the text models' libraries); the exit code's way out of a
    real process is tested in test_cli."""
    from modhifi.__main__ import main

    capture.readouterr()  # what earlier steps printed
    code = main(list(args))
    return Ran(code, *capture.readouterr())


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def snapshot(model: nn.Module) -> dict:
    """Everything a call could change on a model: values and layout of every parameter and
    buffer, each module's training flag and hooks, and its forward method."""
    return {
        "tensors": {k: (v.detach().clone(), v.stride(), v.device) for k, v in
                    [*model.named_parameters(), *model.named_buffers()]},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: {h: len(getattr(m, h, {})) for h in _HOOKS} for n, m in model.named_modules()},
        "forward": {n: "forward" in vars(m) for n, m in model.named_modules()},
        "modules": {n: type(m) for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """The model is bit-identical to its `snapshot`: weights, buffers, layout, modes, hooks."""
    after = snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, (value, stride, device) in before["tensors"].items():
        now, now_stride, now_device = after["tensors"][key]
        assert torch.equal(now, value) and now_stride == stride and now_device == device, key
    for part in ("modes", "hooks", "forward", "modules"):
        assert after[part] == before[part], part


def masked_dense(model: nn.Module, structure, plan) -> nn.Module:
    """The dense model with every consumer's inputs from the plan's removed channels zeroed: what
    physically removing those channels must compute (without compensation or recalibration)."""
    import copy

    masked = copy.deepcopy(model).eval()
    with torch.no_grad():
        for group in plan.groups:
            for name, index in structure.group(group.name).consumers:
                weight = masked.get_submodule(name).weight  # (c_out, c_in[, k, k])
                weight[:, [index[i] for i in group.removed]] = 0
    return masked


def prune_page_numbers(model: str, target: float, *, samples: int | None = None) -> tuple[str, str]:
    """(accuracy, MACs) as a lone session's Prune page shows them for a zoo model at `target`
    of the MACs with the default options, computed by the library directly: the serial oracle.

    `samples`: calibration images (the sidebar's); None: the dashboard's default.
    """
    from modhifi import bench, metrics
    from modhifi.backend import choose_backend
    from modhifi.zoo import open_subject

    cpu = torch.device("cpu")
    subject = open_subject(model, device=cpu)
    data = subject.dataset
    size = {} if samples is None else {"samples": samples}
    analysis = bench.live_analysis(subject.loaded.model, data, backend=choose_backend("cpu"), **size)
    plan = analysis.plan(target, target_kind="macs")
    pruned = analysis.apply(plan, compensation="refit")
    live = data.test.subset(slice(0, bench.LIVE_TEST_IMAGES))
    accuracy = metrics.evaluate(pruned, live, device=cpu, num_classes=data.num_classes).accuracy
    return f"{accuracy:.2%}", f"{plan.macs_after / 1e6:.2f} M"


def layer_time(c_in: int, c_out: int) -> float:
    """The synthetic layer time: bilinear in the widths, so interpolation reproduces it exactly."""
    return 0.002 * c_in * c_out + 0.03 * c_out + 0.1


def synthetic_costs(costs: CostModel, rest: float = 0.5,
                    depthwise: tuple[str, ...] = ()) -> CostModel:
    """`costs` with every layer's table the synthetic time (a depthwise conv's at as many inputs
    as outputs: timed along its output alone) and the rest `rest`: a plan's predicted latency
    then depends on its widths alone, not on how loaded the machine was when `costs` was timed."""
    def table(name: str, t: LayerTimes) -> tuple[tuple[float, ...], ...]:
        if name in depthwise:
            return (tuple(layer_time(o, o) for o in t.out_widths),)
        return tuple(tuple(layer_time(i, o) for o in t.out_widths) for i in t.in_widths)

    layers = {name: dataclasses.replace(t, ms=table(name, t)) for name, t in costs.layers.items()}
    full = sum(layer_time(t.in_widths[-1], t.out_widths[-1]) for t in layers.values())
    return dataclasses.replace(costs, layers=layers, dense_ms=full + rest)


def cache_synthetic_costs(model: str, batch_size: int) -> CostModel:
    """Write the synthetic cost model of zoo model `model` (its layers' grid measured, then every
    time replaced) where the command line looks first: $MODHIFI_CACHE/latency, for this
    process's CPU backend (its threads) at `batch_size`. A command line test of a latency target
    then plans the same way however loaded the machine is (a busy box once timed digits-cnn's
    small layers as leaving less than the 10% asked). Returns what it wrote."""
    from modhifi.backend import choose_backend
    from modhifi.prune import trace_structure
    from modhifi.prune.latency import measure_costs
    from modhifi.zoo import cost_cache, open_subject

    cpu = choose_backend("cpu")
    subject = open_subject(model, device=torch.device("cpu"))
    network, shape = subject.loaded.model, subject.dataset.input_shape
    costs = synthetic_costs(measure_costs(network, trace_structure(network, shape), shape,
                                          backend=cpu, batch_size=batch_size))
    path: Path = cost_cache(model, network, cpu, batch_size, shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(costs.to_json())
    return costs
