"""Apply a plan (method.md §3.2–3.3): compensate the consumers of removed channels (the paper's
δ* rescaling, a full least-squares refit on the dense model's statistics, or the same refit layer
by layer on the pruned network's own inputs), cut the channels with Torch-Pruning, recalibrate
BatchNorm with forward passes. Always on a copy: the analysed model is never modified.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modhifi.batch import Batch, call, example_of, head
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity, ridge_solve
from modhifi.hooks import hooked, private_copy
from modhifi.metrics import channels_last
from modhifi.moments import LayerMoments, regression_moments
from modhifi.options import Compensation, check
from modhifi.prune.structure import Structure, dependency_graph
from modhifi.replay import Frontier, Replay, inside
from modhifi.trace import Trace, trace_forward


def kept_inputs(structure: Structure, model: nn.Module,
                removed: Mapping[str, Iterable[int]]) -> dict[str, torch.Tensor]:
    """consumer -> its kept input channels (sorted), for the consumers that lose any.

    Args:
        structure: the model's channel groups.
        model: the unpruned model (for each consumer's input width).
        removed: group name -> removed channel indices.
    """
    lost: dict[str, set[int]] = {}
    for group in structure.groups:
        for name, index in group.consumers:
            lost.setdefault(name, set()).update(index[i] for i in removed.get(group.name, ()))
    return {name: torch.tensor(sorted(set(range(model.get_submodule(name).weight.shape[1])) - gone))
            for name, gone in lost.items() if gone}


@torch.no_grad()
def compensate(model: nn.Module, fidelity: Mapping[str, LayerFidelity],
               kept: Mapping[str, torch.Tensor], compensation: Compensation, *,
               recalibrate: bool = True) -> None:
    """Overwrite, in place, each consumer's weight by its compensated weight for `kept` inputs.

    Args:
        model: a private copy, before its channels are cut.
        fidelity: consumer -> its `LayerFidelity`.
        kept: consumer -> kept input channels (`kept_inputs`).
        compensation: `refit` (least squares of all kept slices), `rescale` (δ*) or `none`
            (`sequential` is `refit_in_order`, which needs forward passes).
        recalibrate: whether BatchNorm is re-estimated afterwards. A fidelity on centred
            statistics fits all but the output's mean, which recalibration hands to BatchNorm;
            without it the weight is fitted on the uncentred ones (as `refit_in_order`).
    """
    if check(Compensation, compensation) == "none":
        return
    if compensation == "sequential":
        raise ValueError("the sequential refit runs forward passes: call refit_in_order")
    for name, keep in kept.items():
        layer = fidelity[name] if recalibrate else fidelity[name].uncentred()
        weight = layer.refit_weight(keep) if compensation == "refit" else layer.rescaled_weight(keep)
        model.get_submodule(name).weight.copy_(weight)


FRONTIER_BYTES = 2**31  # the most each of the sequential refit's frontiers records; past it,
# the passes run from the input (ResNet-50 at 224×224 with 2,000 images would need 12.7 GiB)


def _read_sets(model: nn.Module, example: Batch,
               order: Sequence[str]) -> tuple[Trace, dict[str, frozenset[str]]]:
    """What a `Frontier` of `model` needs: its trace on `example` (one input) and, for each layer
    of `order`, the prefix modules whose outputs nothing after them reads (`Replay.unread`; for
    tuples and dicts of tensors none is known, so every recording is kept)."""
    if not isinstance(example, torch.Tensor):
        return trace_forward(model, example), {}
    replay = Replay(model, example, order, batch_size=1, max_bytes=sys.maxsize)
    return replay.trace, {name: replay.unread(name) for name in order}


@dataclass(frozen=True)
class Recordings:
    """What one frontier of the sequential refit records at its largest, against the budget."""

    nbytes: int  # on this process, for its calibration inputs (over the budget: perhaps more)
    fits: bool  # within the budget on every process: the passes cost about one forward


@torch.no_grad()
def sequential_recordings(model: nn.Module, example: torch.Tensor, order: Sequence[str],
                          samples: int, *, shard: Shard = ALONE,
                          max_bytes: int | None = None) -> Recordings:
    """What `refit_in_order`'s frontiers will record at their largest over `samples` inputs
    like `example` (one input, as the calibration batches come): the refit's passes run on
    `example` alone, and the most their recordings came to, times `samples` (for each of the
    refit's three frontiers). A consumer's own input is recorded as it is (unless the parent's
    code makes it larger from what is recorded: an upsampling), so where the largest of those is
    over the budget already, the passes do not run (their test of which recordings are read
    costs about a forward pass per consumer). `max_bytes`: the budget (None:
    `FRONTIER_BYTES`)."""
    budget = FRONTIER_BYTES if max_bytes is None else max_bytes
    trace = trace_forward(model, example)
    need = max(math.prod(trace.shapes[name]) for name in order) * example.element_size()
    if need * samples <= budget:
        trace, unread = _read_sets(model, example, order)
        frontier = Frontier(private_copy(model), [example], trace, unread, max_bytes=sys.maxsize)
        for name in order:
            _run_to(frontier, name, trace.calls.get(name) == 1)()
        need = frontier.largest
    need *= samples
    return Recordings(need, shard.all(need <= budget))


@torch.no_grad()
def refit_in_order(pruned: nn.Module, dense: nn.Module, kept: Mapping[str, torch.Tensor],
                   order: Sequence[str], batches: Sequence[Batch], *, centered: Collection[str],
                   lam: float, recalibrate: bool, shard: Shard = ALONE) -> None:
    """The sequential refit: overwrite, in place, each consumer's weight, in forward order, by
    the least squares of the dense layer's output on the kept inputs the consumer receives in
    `pruned` (whose earlier consumers are refitted already, and whose BatchNorm statistics are
    re-estimated first when `recalibrate`), not on the dense model's inputs as `compensate`'s
    one-shot refit does. Each consumer is then fitted to what it will see in the final model.

    The passes up to each consumer replay what the previous pass reached (`replay.Frontier`,
    one for the re-estimation, one for the pruned inputs, one for the dense outputs): about
    three forward passes over the calibration images in all, where the recordings fit in
    memory.

    Args:
        pruned: a private copy of `dense`, before its channels are cut.
        dense: the analysed model (only read: a private copy of it runs).
        kept: consumer -> kept input channels (`kept_inputs`).
        order: every consumer in forward order (`Structure.consumers`).
        batches: the calibration batches (summed over every process of `shard`, which all call
            this with the same arguments: a collective call per consumer).
        centered: consumers whose outputs go straight into a BatchNorm: fitted up to a constant
            per output channel when `recalibrate` (the mean over samples and positions, which
            the re-estimated norm removes; the scores' centring is per position instead).
        lam: ridge strength, relative to the mean diagonal (as `LayerFidelity.refit_weight`).
        recalibrate: re-estimate BatchNorm statistics before each consumer is fitted, as the
            final model's are (`recalibrate_batchnorm`).
    """
    chunks = [part for batch in batches for part in _parts(batch)]
    fitted = [name for name in order if name in kept]
    # the same modules in every copy: one trace, and one test of which recordings are read
    trace, unread = _read_sets(dense, head(chunks[0], 1), fitted)
    reference = private_copy(dense, channels_last=True)
    pruned.to(memory_format=torch.channels_last)  # as the chunks come
    training, inputs, outputs = (Frontier(model, chunks, trace, unread, max_bytes=FRONTIER_BYTES,
                                          agree=shard.all)
                                 for model in (pruned, pruned, reference))
    norms = batchnorms(pruned)
    for name in fitted:
        called_once = trace.calls.get(name) == 1  # then each pass can end at the layer
        if recalibrate:  # the norms the last pass settled keep their statistics
            _reestimate(pruned, {n: m for n, m in norms.items()
                                 if not inside(n, training.settled)},
                        _run_to(training, name, called_once), shard)
        keep, layer = kept[name], reference.get_submodule(name)
        axis = 1 if isinstance(layer, nn.Conv2d) else -1  # the input channels' axis
        reading = _reading(layer, len(keep))
        sums: LayerMoments | None = None
        # strict: both passes run to their end, where the frontiers settle what they reached
        for x, y in zip(_captured(inputs, name, output=False, called_once=called_once),
                        _captured(outputs, name, output=True, called_once=called_once),
                        strict=True):
            # rows [patch of the kept pruned inputs, dense output]
            part = regression_moments(reading, x.index_select(axis, keep),
                                      _output_rows(layer, y)).float64()
            sums = part if sums is None else sums + part
        sums = sums.summed(shard)
        H = (sums.pooled_centered_second() if recalibrate and name in centered
             else sums.mean_second())
        C = reading.weight[0].numel()  # the kept patch features, then the c_out outputs
        new = torch.zeros_like(layer.weight)  # (c_out, c_in[, k, k])
        fit = ridge_solve(H[:C, :C], H[:C, C:], lam).T                    # (c_out, |keep|·k²)
        new[:, keep] = fit.reshape(len(new), len(keep), *new.shape[2:]).to(new)
        pruned.get_submodule(name).weight.copy_(new)
    pruned.to(memory_format=torch.contiguous_format)


def _reading(layer: nn.Conv2d | nn.Linear, width: int) -> nn.Conv2d | nn.Linear:
    """A weightless stand-in (meta device) for `layer` that reads `width` input channels: the
    same kernel, stride, padding and dilation, for `regression_moments`."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(width, 1, bias=False, device="meta")
    return nn.Conv2d(width, 1, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                     bias=False, padding_mode=layer.padding_mode, device="meta")


def _captured(frontier: Frontier, name: str, *, output: bool,
              called_once: bool) -> Iterator[torch.Tensor]:
    """The input (or the output) of layer `name` of the frontier's model on each chunk: every
    call's rows one after another. A layer `called_once` ends each pass."""
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, *result: torch.Tensor) -> None:
        if called_once:
            seen.append(result[0] if output else args[0])
            raise _Reached
        # the pass goes on: a later in-place operation must not change what was kept
        seen.append((result[0] if output else args[0]).clone())

    with hooked(frontier.model, **{"after" if output else "before": {name: keep}},
                private=True) as run:
        for chunk in frontier.passes(name):
            _run(run, chunk)
            yield seen[0] if len(seen) == 1 else torch.cat(seen)
            seen.clear()


def _run_to(frontier: Frontier, name: str, stop: bool) -> Callable[[], None]:
    """Passes of the frontier's model over its chunks up to layer `name` (to the end unless
    `stop`)."""
    def run() -> None:
        with hooked(frontier.model, before={name: _stop} if stop else None, private=True):
            for chunk in frontier.passes(name):
                _run(frontier.model, chunk)
    return run


def _output_rows(layer: nn.Conv2d | nn.Linear, output: torch.Tensor) -> torch.Tensor:
    """(N, L, c_out): the layer's output without its bias, one row per output position (H'·W'
    in row-major order, or the flattened token axes), as `regression_moments` takes targets."""
    if isinstance(layer, nn.Conv2d):  # (N, c_out, H', W') -> (N, H'·W', c_out)
        output = output.flatten(2).transpose(1, 2)
    if layer.bias is not None:
        output = output - layer.bias
    return output.reshape(len(output), -1, output.shape[-1])


class _Reached(Exception):
    """Ends a forward pass at the layer it needs (before it starts, or after it ends)."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Reached


_CHUNK = 128  # images per forward pass: oneDNN's faster convolutions, activations in cache


def _parts(batch: Batch, chunk: int = _CHUNK) -> list[Batch]:
    """`batch` as forward passes: a tensor `chunk` images at a time in channels-last layout (a
    lone last image with the pass before it: BatchNorm in training mode cannot take one image
    of 1×1 maps), other forms whole."""
    if not isinstance(batch, torch.Tensor):
        return [batch]
    parts = list(batch.split(chunk))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [batch[-len(parts[-2]) - 1:]]
    return [channels_last(part) for part in parts]


def _run(model: nn.Module, part: Batch) -> None:
    """One forward pass of `part`; a hook raising `_Reached` ends it early."""
    try:
        call(model, part)
    except _Reached:
        pass


def _forward(model: nn.Module, batch: Batch, chunk: int = _CHUNK) -> None:
    """Run `batch` through `model` (`_parts`, `_run`)."""
    for part in _parts(batch, chunk):
        _run(model, part)


def cut_channels(model: nn.Module, removed: dict[str, Iterable[int]], input_shape) -> None:
    """Remove channels in place: group (first producer's name) -> channel indices.

    Torch-Pruning's dependency graph cuts every coupled layer of a group together; the cut
    weights it makes are frozen where the weights they replace were.
    """
    device = next(model.parameters()).device
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    with dependency_graph(model, example_of(input_shape, device)) as graph:
        for name, index in removed.items():
            index = sorted(int(i) for i in index)
            if not index:
                continue
            layer = dict(model.named_modules()).get(name)
            width = getattr(layer, "out_channels", getattr(layer, "out_features", 0))
            if not width or not 0 <= index[0] <= index[-1] < width:
                raise UserError(f"cannot remove channels {index[:4]}… of {name}: the model has "
                                "no such layer or channels; pass a plan made for this model")
            prune_out = graph.get_pruner_of_module(layer).prune_out_channels
            group = graph.get_pruning_group(layer, prune_out, idxs=index)
            if not graph.check_pruning_group(group):
                raise UserError(f"cannot remove {len(index)} channels of {name}: a layer would "
                                "be left with none; lower the target")
            group.prune()
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """name -> the model's BatchNorm layers with running statistics (what recalibration
    re-estimates; none in a LayerNorm ViT)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *,
                          chunk: int = _CHUNK, shard: Shard = ALONE) -> None:
    """Re-estimate BatchNorm running statistics with forward passes (no gradients, no labels):
    each BatchNorm's mean over its calls of the call's batch mean and (unbiased) variance, added
    up in float64 (over every process of `shard` when several share the batches: a collective
    call then). `model` is the caller's own copy (an analysis' pruned model): hooked in place.

    Runs `chunk` images at a time in channels-last layout (`_forward`) and hands the model back
    in the usual contiguous layout.
    """
    norms = batchnorms(model)
    if not norms:
        return
    model.to(memory_format=torch.channels_last)
    try:
        _reestimate(model, norms, lambda: [_forward(model, b, chunk) for b in batches], shard)
    finally:
        model.to(memory_format=torch.contiguous_format)  # channels-last weights slow NCHW exports


def _reestimate(model: nn.Module, norms: Mapping[str, nn.Module],
                passes: Callable[[], object], shard: Shard) -> None:
    """Reset `norms`, BatchNorms of `model` (hooked in place), and re-estimate them over the
    forward `passes` (`recalibrate_batchnorm`); a norm the passes never call keeps reset
    statistics. No norms: nothing runs."""
    if not norms:
        return
    saved = {name: m.momentum for name, m in norms.items()}
    widths = [m.num_features for m in norms.values()]
    device = next(iter(norms.values())).running_mean.device
    # per BatchNorm: Σ batch means (C), Σ batch variances (C), calls (1), in one flat buffer
    sums = torch.zeros(sum(2 * c + 1 for c in widths), dtype=torch.float64, device=device)
    parts = dict(zip(norms, sums.split([2 * c + 1 for c in widths])))

    def add_call(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            c = module.num_features  # momentum 1: the buffers now hold this call's statistics
            parts[name][:c] += module.running_mean.double()
            parts[name][c:2 * c] += module.running_var.double()
            parts[name][2 * c] += 1
        return hook

    for m in norms.values():
        m.reset_running_stats()
        m.momentum = 1.0
        m.train()
    try:
        with hooked(model, after={name: add_call(name) for name in norms}, private=True):
            try:
                passes()
            except ValueError as error:  # torch's "Expected more than 1 value per channel"
                if "more than 1 value per channel" not in str(error):
                    raise
                raise UserError("BatchNorm recalibration met a pass of one image with 1×1 "
                                "feature maps, which has no variance: calibrate on batches of "
                                "2 images or more (--calib-samples 2 or more)") from None
        shard.sum(sums)
        for name, m in norms.items():
            c, calls = m.num_features, parts[name][-1]
            if calls:  # never called: the reset statistics stay
                m.running_mean.copy_(parts[name][:c] / calls)
                m.running_var.copy_(parts[name][c:2 * c] / calls)
                m.num_batches_tracked.fill_(int(calls))
    finally:
        for name, m in norms.items():
            m.momentum = saved[name]
            m.eval()
