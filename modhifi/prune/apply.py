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


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers (what recalibration re-estimates; none in a LayerNorm ViT)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *,
                          chunk: int = 128, shard: Shard = ALONE) -> None:
    """Re-estimate BatchNorm running statistics with forward passes (no gradients, no labels):
    the mean over passes of `chunk` images of each pass's batch mean and (unbiased) variance,
    summed in float64 (over every process of `shard` when several share the batches).

    Runs in channels-last layout (oneDNN's faster convolutions), which keeps activations in
    cache, and hands the model back in the usual contiguous layout.
    """
    norms = batchnorms(model)
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    device = norms[0].running_mean.device
    sums = [torch.zeros(2, m.num_features, dtype=torch.float64, device=device) for m in norms]
    passes = torch.zeros(1, dtype=torch.float64, device=device)
    for m in norms:
        m.reset_running_stats()
        m.momentum = 1.0  # after each pass the running statistics are that pass's own
        m.train()

    def add_pass() -> None:
        passes.add_(1)
        for total, m in zip(sums, norms):  # (2, C): Σ batch means, Σ batch variances
            total[0] += m.running_mean.double()
            total[1] += m.running_var.double()

    model.to(memory_format=torch.channels_last)
    try:
        for batch in batches:
            if not isinstance(batch, torch.Tensor):  # token ids with a mask, say: as it comes
                call(model, batch)
                add_pass()
                continue
            for part in batch.split(chunk):
                model(channels_last(part))
                add_pass()
        shard.sum(passes)
        for total, m in zip(sums, norms):
            shard.sum(total)
            if passes.item():  # no pass anywhere: the reset statistics stay
                m.running_mean.copy_(total[0] / passes)
                m.running_var.copy_(total[1] / passes)
                m.num_batches_tracked.fill_(int(passes.item()))
    finally:
        model.to(memory_format=torch.contiguous_format)  # channels-last weights slow NCHW exports
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()

