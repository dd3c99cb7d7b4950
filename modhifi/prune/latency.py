"""The latency cost model behind latency targets: each Conv2d/Linear layer timed alone at candidate
widths on one device and batch size, the rest of the forward pass, and a plan's latency predicted
from them before anything changes.

MACs do not say what a plan saves in time: small layers are bound by memory and call overhead,
and vector units run whole blocks of 8 or 16 channels (docs/results.md, "speed"). So each layer
is timed as it is, a lone copy of its shape at every candidate (input, output) width, the
candidates in alternation so that machine noise hits them alike; a width between two candidates
is interpolated. What the layers' own times leave out of the whole inference-optimised forward
(BatchNorm, activations, additions, pooling: work on the activations the layers write) is taken
to shrink with the share of those activations a plan keeps. Measured once per model, device and
batch size, and cached on disk beside the model: `measured_costs(..., cache=FOLDER)`.
"""
from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from modhifi.backend import Backend, time_calls, time_side_by_side
from modhifi.batch import example_of
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.hooks import hooked
from modhifi.metrics import channels_last, optimise_for_inference
from modhifi.options import ROUND_TO
from modhifi.prune.structure import Structure

WIDTHS = 8      # candidate widths timed per prunable dimension of a layer (the full one included)
REPEATS = 7     # timed calls per candidate, after one warm-up call each
VERSION = 1     # of the cached files' layout
T = TypeVar("T")


@dataclass(frozen=True)
class LayerTimes:
    """One layer's measured forward time over a grid of (input, output) widths."""

    in_widths: tuple[int, ...]   # ascending, the layer's full width last
    out_widths: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]  # (len(in_widths), len(out_widths)) median ms per batch
    outputs: int  # output elements per sample at full width (what the rest of the pass touches)

    @classmethod
    def from_state(cls, state: dict) -> LayerTimes:
        """From its fields as JSON holds them (lists for tuples)."""
        return cls(tuple(state["in_widths"]), tuple(state["out_widths"]),
                   tuple(map(tuple, state["ms"])), state["outputs"])

    def at(self, c_in: int, c_out: int) -> float:
        """Milliseconds at `c_in` input and `c_out` output channels: interpolated linearly
        between the two nearest widths timed in each dimension (the nearest outside them).
        Not monotone: a narrower copy can be timed slower (16-wide vector units, noise)."""
        i, a = _between(self.in_widths, c_in)
        j, b = _between(self.out_widths, c_out)

        def along(row: tuple[float, ...]) -> float:  # at c_out, on one input width's row
            return (1 - b) * row[j] + b * row[j + 1] if b else row[j]

        return (1 - a) * along(self.ms[i]) + a * along(self.ms[i + 1]) if a else along(self.ms[i])


def _between(widths: tuple[int, ...], width: int) -> tuple[int, float]:
    """(k, t): `width` lies t of the way from widths[k] to widths[k + 1] (t = 0 at or outside)."""
    k = bisect.bisect_right(widths, width) - 1
    if k < 0 or k == len(widths) - 1:
        return max(k, 0), 0.0
    return k, (width - widths[k]) / (widths[k + 1] - widths[k])


@dataclass(frozen=True)
class CostModel:
    """A model's measured latency at full width and its layers' times at candidate widths."""

    device: str
    batch_size: int
    dense_ms: float                 # median ms of the whole inference-optimised forward
    layers: Mapping[str, LayerTimes]  # every Conv2d/Linear the pass calls, by module name
    seconds: float = 0.0            # what measuring took

    @cached_property
    def rest_ms(self) -> float:
        """The part of `dense_ms` the layers' own times leave out (negative where the optimised
        pass fuses more than the lone layers show)."""
        return self.dense_ms - self._full_ms

    @cached_property
    def _full_ms(self) -> float:
        """The layers' own times at full width (computed once: `predict` runs in bisections)."""
        return sum(t.at(t.in_widths[-1], t.out_widths[-1]) for t in self.layers.values())

    def predict(self, structure: Structure, kept: Mapping[str, int]) -> float:
        """Milliseconds of a forward pass once each group keeps `kept[group]` channels (the
        groups left out keep all theirs).

        The layers' own times at the plan's widths, plus the rest shrunk with the share of the
        activations they write; where the rest is negative (the lone layers add up to more than
        the pass), the layers' times scaled down to the pass instead, so that the rest never
        grows as channels go. (The layers' own times can: `LayerTimes.at`.)

        Args:
            structure: the model's channel groups, as traced now (a pruned model's in later steps).
            kept: group name -> channels it keeps.
        """
        missing = [name for name in structure.order if name not in self.layers]
        strange = [name for name in self.layers if name not in structure.layers]
        if missing or strange:
            raise UserError(f"the latency cost model does not fit this model (layer "
                            f"{(missing or strange)[0]!r}): it was measured for another model; "
                            "measure it again")
        sizes = {g.name: g.size for g in structure.groups}
        wider = [name for name, t in self.layers.items()
                 if _width(structure.layers[name].in_group, {}, sizes, 0) > t.in_widths[-1]
                 or _width(structure.layers[name].out_group, {}, sizes, 0) > t.out_widths[-1]]
        if wider:
            raise UserError(f"the latency cost model does not fit this model (layer {wider[0]!r} "
                            "is wider than it was timed): it was measured for another model; "
                            "measure it again")
        spent = written = total = 0.0
        for name, times in self.layers.items():
            layer = structure.layers[name]
            c_in = _width(layer.in_group, kept, sizes, times.in_widths[-1])
            c_out = _width(layer.out_group, kept, sizes, times.out_widths[-1])
            spent += times.at(c_in, c_out)
            written += times.outputs * c_out / times.out_widths[-1]
            total += times.outputs
        if self.rest_ms < 0:
            return spent * self.dense_ms / self._full_ms
        return spent + self.rest_ms * (written / total if total else 1.0)

    def to_json(self) -> str:
        return to_json(self)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        state = from_json(text)
        layers = {name: LayerTimes.from_state(t) for name, t in state.pop("layers").items()}
        return cls(layers=layers, **state)


def to_json(costs) -> str:
    """A cost model (a dataclass) as its cache file's text."""
    return json.dumps({"version": VERSION, **asdict(costs)}, indent=1)


def from_json(text: str) -> dict:
    """A cost model's fields from its cache file's text; ValueError for another layout."""
    state = json.loads(text)
    if state.pop("version", None) != VERSION:
        raise ValueError("another layout")
    return state


def cached(cache: Path | None, read: Callable[[str], T], measure: Callable[[], T], *,
           progress: Callable[[str], None] = lambda line: None, how: str = "measuring") -> T:
    """`read` of the file `cache` where it holds a readable cost model, else `measure()`, then
    written there atomically (left unwritten in a read-only folder: measured again next time).
    One thread or process at a time measures into a folder (`_one_at_a_time`): the others wait,
    then read what it wrote, rather than time their copies against each other. `progress` is
    told which of the two happens, `how` saying what measuring does."""
    from modhifi.zoo import write_atomically

    def readable() -> T | None:
        if cache.is_file():
            try:
                costs = read(cache.read_text())
            except (ValueError, KeyError, TypeError):  # an older layout: measure again
                return None
            progress(f"latency cost model: read from {cache}")
            return costs
        return None

    if cache is None:
        progress(f"latency cost model: {how}")
        return measure()
    if (costs := readable()) is not None:
        return costs
    with _one_at_a_time(cache.parent):
        if (costs := readable()) is not None:  # measured while this one waited
            return costs
        progress(f"latency cost model: {how}, kept in {cache}")
        costs = measure()
        try:
            write_atomically(cache, lambda path: path.write_text(costs.to_json()))
        except OSError:
            pass
    return costs


_FOLDER_LOCKS: dict[Path, threading.Lock] = {}
_FOLDER_LOCKS_GUARD = threading.Lock()


@contextmanager
def _one_at_a_time(folder: Path) -> Iterator[None]:
    """Hold `folder` for one measurement: a lock per folder for this process's threads, and an
    advisory lock (flock) on the folder itself for other processes (made first where it can be;
    none where it cannot be opened)."""
    with _FOLDER_LOCKS_GUARD:
        lock = _FOLDER_LOCKS.setdefault(folder.resolve(), threading.Lock())
    with lock:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(folder, os.O_RDONLY)
        except OSError:  # read-only: this process's threads only
            descriptor = None
        try:
            if descriptor is not None:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            if descriptor is not None:
                os.close(descriptor)  # releases the flock


def _width(group: str | None, kept: Mapping[str, int], sizes: Mapping[str, int],
           full: int) -> int:
    """A layer side's width under a plan: its group's kept count, its present size when the
    plan leaves it whole, `full` when no group owns it."""
    return kept.get(group, sizes[group]) if group in sizes else full


def candidate_widths(full: int, *, step: int = ROUND_TO, count: int = WIDTHS) -> tuple[int, ...]:
    """The widths timed for a dimension of `full` channels: multiples of `step` below it and
    itself, at most `count`, evenly spread when there are more (ascending)."""
    widths = list(range(step, full, step)) + [full]
    if len(widths) <= count:
        return tuple(widths)
    picks = {round(k * (len(widths) - 1) / (count - 1)) for k in range(count)}
    return tuple(widths[k] for k in sorted(picks))


def _replica(module: nn.Module, c_in: int, c_out: int, backend: Backend) -> nn.Module:
    """A fresh layer of `module`'s kind and geometry with `c_in` inputs and `c_out` outputs on
    `backend`'s device (random weights: the time does not depend on them)."""
    if isinstance(module, nn.Linear):
        return backend.build(lambda: nn.Linear(c_in, c_out))
    if _depthwise(module):  # one filter per channel: as many inputs and groups as outputs
        c_in = groups = c_out
    else:
        groups = module.groups
    return backend.build(lambda: nn.Conv2d(
        c_in, c_out, module.kernel_size, module.stride, module.padding, module.dilation, groups,
        bias=True)).to(memory_format=torch.channels_last)  # BatchNorm folds into a bias


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and \
        module.groups == module.in_channels == module.out_channels


def _grid(module: nn.Module, name: str, structure: Structure) -> tuple[tuple[int, ...], ...]:
    """The (input widths, output widths) to time `module` at: candidates along each side a
    channel group owns, the full width alone along the others (and along a depthwise conv's
    input, which follows its output)."""
    layer = structure.layers.get(name)
    c_in, c_out = module.weight.shape[1] * getattr(module, "groups", 1), module.weight.shape[0]
    grouped = getattr(module, "groups", 1) > 1 and not _depthwise(module)  # left whole
    owned_in = (layer is not None and layer.in_group is not None and not grouped
                and not _depthwise(module))
    owned_out = layer is not None and layer.out_group is not None and not grouped
    return (candidate_widths(c_in) if owned_in else (c_in,),
            candidate_widths(c_out) if owned_out else (c_out,))


@torch.no_grad()
def _time_layer(module: nn.Module, shape: tuple[int, ...], widths, *, backend: Backend,
                batch_size: int) -> tuple[tuple[float, ...], ...]:
    """(len(in widths), len(out widths)) median ms of lone copies of `module` at each width, on
    a random batch of `batch_size` inputs of one-sample `shape` (the width axis resized to each
    copy's input: a depthwise conv's follows its output). One input width's copies at a time,
    timed in alternation, so that only they are held."""
    conv = isinstance(module, nn.Conv2d)
    axis = 0 if conv else len(shape) - 1  # channels, or a Linear's last axis
    inputs: dict[int, torch.Tensor] = {}

    def batch(width: int) -> torch.Tensor:
        if width not in inputs:
            resized = list(shape)
            resized[axis] = width
            inputs[width] = channels_last(backend.random(batch_size, *resized))
        return inputs[width]

    rows = []
    for c_in in widths[0]:
        copies = [_replica(module, c_in, c_out, backend).eval() for c_out in widths[1]]
        calls = [lambda m=m, x=batch(m.in_channels if conv else m.in_features): m(x)
                 for m in copies]
        rows.append(tuple(t.median_ms for t in time_side_by_side(backend, calls, warmup=1,
                                                                 repeats=REPEATS)))
    return tuple(rows)


def _shapes(model: nn.Module, input_shape) -> dict[str, tuple[tuple[int, ...], int]]:
    """Conv2d/Linear name -> (one sample's input shape, its output elements), from one pass."""
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    seen: dict[str, tuple[tuple[int, ...], int]] = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, (tuple(args[0].shape[1:]), output[0].numel()))
        return hook

    device = next(model.parameters()).device
    with hooked(model, after={name: record(name) for name in layers}) as run, torch.no_grad():
        run(example_of(input_shape, device))
    return seen


def measure_costs(model: nn.Module, structure: Structure, input_shape: tuple[int, ...], *,
                  backend: Backend, batch_size: int = 64) -> CostModel:
    """Time `model`'s whole optimised forward and each of its Conv2d/Linear layers at candidate
    widths (`candidate_widths` along each side a channel group owns), on `backend`'s device.

    Args:
        model: the network (only read).
        structure: its channel groups (`trace_structure`).
        input_shape: (C, H, W) of one input.
        batch_size: inputs per timed call, as the latency target means it.
    """
    if not isinstance(input_shape, tuple):
        raise UserError("a latency target needs image inputs of one shape; use --target-kind "
                        "macs for this model")
    start = time.perf_counter()
    example = backend.random(batch_size, *input_shape)
    optimised = optimise_for_inference(model, example)
    fast = channels_last(example)
    with torch.no_grad():
        dense = time_calls(backend, lambda: optimised(fast))  # as `metrics.measure_latency`
    layers = {}
    for name, (shape, outputs) in _shapes(model, input_shape).items():
        module = model.get_submodule(name)
        widths = _grid(module, name, structure)
        layers[name] = LayerTimes(*widths, _time_layer(module, shape, widths, backend=backend,
                                                       batch_size=batch_size), outputs)
    return CostModel(backend.description, batch_size, dense.median_ms, layers,
                     time.perf_counter() - start)


def cost_file(folder: Path, stem: str, model: nn.Module, backend: Backend, batch_size: int,
              inputs: object) -> Path:
    """Where `model`'s cost model for this device, batch size and `inputs` (one input's shape,
    or what else the timing batches depend on) is cached in `folder`: the name carries a digest
    of what the times depend on (every layer's shape, the inputs, the device and its threads,
    the processor, torch's version), so a changed model or machine is measured again."""
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    machine = (platform.machine(), os.cpu_count(), torch.backends.cpu.get_cpu_capability())
    key = repr((shapes, inputs, backend.description, machine, batch_size, torch.__version__,
                VERSION))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(folder) / f"{stem}.latency-b{batch_size}-{digest}.json"


def measured_costs(model: nn.Module, structure: Structure, input_shape: tuple[int, ...], *,
                   backend: Backend, batch_size: int = 64, cache: Path | None = None,
                   shard: Shard = ALONE,
                   progress: Callable[[str], None] = lambda line: None) -> CostModel:
    """`measure_costs`, read from the file `cache` when it holds them, else measured and
    written there (`cached`, which tells `progress` which); with several processes (`shard`),
    process 0 measures and the others take its model, so that every process plans alike."""
    def measure() -> CostModel:
        return measure_costs(model, structure, input_shape, backend=backend,
                             batch_size=batch_size)

    return shard.on_main(lambda: cached(cache, CostModel.from_json, measure, progress=progress,
                                        how="timing each layer at candidate widths"))
