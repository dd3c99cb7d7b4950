"""The channel card: why one input channel of a layer matters. The calibration images that drive
it hardest and its maps over them, the outputs it feeds and its fidelity to each, its rank by
every criterion, the layer's output error without it, the plan that removes it alone, and how
the greedy selection keeps its group (`greedy_steps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from modhifi.errors import UserError
from modhifi.hooks import hooked
from modhifi.prune.analysis import Analysis
from modhifi.prune.plan import GroupPlan, PrunePlan
from modhifi.prune.structure import ChannelGroup

CARD_METHODS = ("modhifi", "modhifi-greedy", "l1", "activation")  # the ranks a card shows
FEEDS = 10  # outputs listed: those the channel explains best


@dataclass(frozen=True, eq=False)
class ChannelCard:
    """One input channel of one consumer layer, and the evidence for keeping it."""

    layer: str
    channel: int                 # input channel of `layer`
    group: str                   # the channel group it belongs to
    group_channel: int           # its index in that group
    group_size: int
    ranks: dict[str, int]        # method -> place in the group's keep order (1 = kept first)
    feeds: pd.DataFrame          # output, singleton, saliency_share: the outputs it explains best
    # The layer's output error without it, Σ_c E‖ΔY_c‖² / Σ_c E‖Y_c‖² on the calibration images:
    error_refit: float           # once the other inputs are refitted
    error_removed: float         # without compensation
    drivers: tuple[int, ...]     # calibration images that drive it hardest, strongest first
    strength: tuple[float, ...]  # their mean activation of the channel
    images: np.ndarray           # (k, H, W) the driver images (first input channel, normalised)
    maps: np.ndarray             # (k, h, w) the channel over each of them, as `layer` reads it

    def ranks_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"criterion": list(self.ranks), "rank": list(self.ranks.values()),
                             "of": self.group_size})


def group_of(analysis: Analysis, layer: str, channel: int) -> tuple[ChannelGroup, int]:
    """The prunable group an input channel of `layer` belongs to, and its index there."""
    for group in analysis.structure.groups:
        for name, index in group.consumers:
            if name == layer and channel in index:
                return group, index.index(channel)
    raise UserError(f"input channel {channel} of {layer} belongs to no prunable group; pick a "
                    "layer and channel from the Fidelity page's table")


def channel_card(analysis: Analysis, layer: str, channel: int, *, images: int = 6,
                 methods: tuple[str, ...] = CARD_METHODS) -> ChannelCard:
    """The card of input `channel` of consumer `layer` (one forward pass over the calibration
    images, on the analysis' private model copy).

    Args:
        analysis: of an image model (its calibration batches are image tensors).
        layer: a consumer layer (a key of `analysis.fidelity`).
        channel: its input channel.
        images: how many driver images to keep.
    """
    if layer not in analysis.fidelity:
        raise UserError(f"{layer} is not a scored layer; pick one of "
                        f"{', '.join(analysis.fidelity)}")
    fidelity = analysis.fidelity[layer]
    c_out, c_in, _ = fidelity.w.shape
    if not 0 <= channel < c_in:
        raise UserError(f"{layer} has input channels 0 to {c_in - 1}; pick one of them")
    group, j = group_of(analysis, layer, channel)
    ranks = {m: analysis.ranking(m)[group.name].order.index(j) + 1 for m in methods}
    share = fidelity.saliency[:, channel] / fidelity.energy.clamp(min=1e-30)  # (c_out,)
    feeds = pd.DataFrame({"output": range(c_out),
                          "singleton": fidelity.singleton[:, channel].cpu().numpy(),
                          "saliency_share": share.cpu().numpy()})
    feeds = feeds.nlargest(min(FEEDS, c_out), "singleton").reset_index(drop=True)
    keep = torch.tensor([i for i in range(c_in) if i != channel], device=fidelity.w.device)
    energy = float(fidelity.energy.sum().clamp(min=1e-30))
    zeroed = fidelity.w.clone()
    zeroed[:, channel] = 0
    refit = float(fidelity.reconstruction_error(fidelity.refit_weight(keep)).sum()) / energy
    removed = float(fidelity.reconstruction_error(zeroed).sum()) / energy
    drivers, strength, pictures, maps = _drivers(analysis, layer, channel, images)
    return ChannelCard(layer, channel, group.name, j, group.size, ranks, feeds, refit, removed,
                       drivers, strength, pictures, maps)


def greedy_steps(analysis: Analysis, layer: str, channel: int) -> pd.DataFrame:
    """How greedy subset fidelity keeps the group of input `channel` of `layer`: one row per
    channel in the order it was added, with the mean refit fidelity it added over every output
    of every layer that reads the group (`gain`), that fidelity so far (`fidelity`), and its
    place in the paper's union-rule order (`union_rank`); channels in `layer`'s numbering."""
    group, _ = group_of(analysis, layer, channel)
    greedy = analysis.ranking("modhifi-greedy")[group.name]
    union = {j: place for place, j in enumerate(analysis.ranking("modhifi")[group.name].order, 1)}
    outputs = sum(analysis.fidelity[name].w.shape[0] for name, _ in group.consumers)
    index = dict(group.consumers)[layer]  # group channel -> this layer's input channel
    gain = np.asarray(greedy.gain) / outputs
    return pd.DataFrame({"step": range(1, group.size + 1),
                         "channel": [index[j] for j in greedy.order],
                         "gain": gain, "fidelity": gain.cumsum(),
                         "union_rank": [union[j] for j in greedy.order]})


def _drivers(analysis: Analysis, layer: str, channel: int,
             count: int) -> tuple[tuple[int, ...], tuple[float, ...], np.ndarray, np.ndarray]:
    """The calibration images whose input to `layer` has the largest mean on `channel`."""
    if not all(isinstance(b, Tensor) and b.dim() == 4 for b in analysis.calibration):
        raise UserError("the channel card shows images: it needs a model with image inputs")
    seen: list[Tensor] = []  # per batch: (B, h, w) the channel's map (over patches or tokens)

    def record(module, args) -> None:
        x = args[0]  # (B, C, h, w) for a conv; (B, T, C) tokens or (B, C) for a linear layer
        if x.dim() == 4:
            seen.append(x[:, channel].float().cpu())
        elif x.dim() == 3:
            seen.append(_token_map(x[..., channel]).float().cpu())
        else:
            seen.append(x[:, channel, None, None].float().cpu())

    with torch.inference_mode(), hooked(analysis.model, before={layer: record}) as run:
        for batch in analysis.calibration:
            run(batch)
    maps = torch.cat(seen)  # (N, h, w)
    strength = maps.mean((1, 2))
    top = strength.topk(min(count, len(strength))).indices
    pictures = torch.cat([b.cpu() for b in analysis.calibration])[top, 0]  # (k, H, W)
    return (tuple(top.tolist()), tuple(strength[top].tolist()), pictures.numpy(),
            maps[top].numpy())


def _token_map(values: Tensor) -> Tensor:
    """(B, T) one channel at each token -> (B, s, s) over the patch grid when the tokens are a
    class token and s² patches in row order (a ViT), else a (B, 1, T) strip."""
    side = math.isqrt(values.shape[1] - 1)
    if side > 1 and side * side == values.shape[1] - 1:
        return values[:, 1:].reshape(len(values), side, side)
    return values[:, None, :]


def without_channel(analysis: Analysis, card: ChannelCard) -> PrunePlan:
    """The plan that removes this one channel and nothing else."""
    group = analysis.structure.group(card.group)
    kept = tuple(i for i in range(group.size) if i != card.group_channel)
    macs, params = analysis.structure.cost({group.name: group.size - 1})
    return PrunePlan("only this channel", 1 / group.size, "channels", "uniform", "all",
                     (GroupPlan(group.name, group.size, kept, (card.group_channel,)),),
                     analysis.structure.macs, macs, analysis.structure.params, params)
