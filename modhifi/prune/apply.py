"""Apply a plan (method.md §3.2–3.3): compensate the consumers of removed channels (the paper's
δ* rescaling, or a full least-squares refit), cut the channels with Torch-Pruning, recalibrate
BatchNorm with forward passes. Always on a copy: the analysed model is never modified.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from modhifi.batch import call, example_of
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity
from modhifi.hooks import hooked
from modhifi.metrics import channels_last
from modhifi.options import Compensation, check
from modhifi.prune.structure import Structure, dependency_graph


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
               kept: Mapping[str, torch.Tensor], compensation: Compensation) -> None:
    """Overwrite, in place, each consumer's weight by its compensated weight for `kept` inputs.

    Args:
        model: a private copy, before its channels are cut.
        fidelity: consumer -> its `LayerFidelity`.
        kept: consumer -> kept input channels (`kept_inputs`).
        compensation: `refit` (least squares of all kept slices), `rescale` (δ*) or `none`.
    """
    if check(Compensation, compensation) == "none":
        return
    for name, keep in kept.items():
        layer = fidelity[name]
        weight = layer.refit_weight(keep) if compensation == "refit" else layer.rescaled_weight(keep)
        model.get_submodule(name).weight.copy_(weight)


def cut_channels(model: nn.Module, removed: dict[str, Iterable[int]], input_shape) -> None:
    """Remove channels in place: group (first producer's name) -> channel indices.

    Torch-Pruning's dependency graph cuts every coupled layer of a group together.
    """
    device = next(model.parameters()).device
    graph = dependency_graph(model, example_of(input_shape, device))
    for name, index in removed.items():
        index = sorted(int(i) for i in index)
        if not index:
            continue
        layer = dict(model.named_modules()).get(name)
        width = getattr(layer, "out_channels", getattr(layer, "out_features", 0))
        if not width or not 0 <= index[0] <= index[-1] < width:
            raise UserError(f"cannot remove channels {index[:4]}… of {name}: the model has no "
                            "such layer or channels; pass a plan made for this model")
        prune_out = graph.get_pruner_of_module(layer).prune_out_channels
        group = graph.get_pruning_group(layer, prune_out, idxs=index)
        if not graph.check_pruning_group(group):
            raise UserError(f"cannot remove {len(index)} channels of {name}: a layer would "
                            "be left with none; lower the target")
        group.prune()


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """name -> the model's BatchNorm layers with running statistics (what recalibration
    re-estimates; none in a LayerNorm ViT)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *,
                          chunk: int = 128, shard: Shard = ALONE) -> None:
    """Re-estimate BatchNorm running statistics with forward passes (no gradients, no labels):
    each BatchNorm's mean over its calls of the call's batch mean and (unbiased) variance, added
    up in float64 (over every process of `shard` when several share the batches: a collective
    call then). `model` is the caller's own copy (an analysis' pruned model): hooked in place.

    Runs `chunk` images at a time in channels-last layout (oneDNN's faster convolutions), which
    keeps activations in cache, and hands the model back in the usual contiguous layout.
    """
    norms = batchnorms(model)
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
    model.to(memory_format=torch.channels_last)
    try:
        with hooked(model, after={name: add_call(name) for name in norms}, private=True):
            for batch in batches:
                if not isinstance(batch, torch.Tensor):  # token ids with a mask, say: as it comes
                    call(model, batch)
                    continue
                for part in batch.split(chunk):
                    model(channels_last(part))
        shard.sum(sums)
        for name, m in norms.items():
            c, calls = m.num_features, parts[name][-1]
            if calls:  # never called: the reset statistics stay
                m.running_mean.copy_(parts[name][:c] / calls)
                m.running_var.copy_(parts[name][c:2 * c] / calls)
                m.num_batches_tracked.fill_(int(calls))
    finally:
        model.to(memory_format=torch.contiguous_format)  # channels-last weights slow NCHW exports
        for name, m in norms.items():
            m.momentum = saved[name]
            m.eval()

