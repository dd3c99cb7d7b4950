"""The analysis as tables for people: every score of every (layer, channel), a layer's scores as
matrices, fidelity curves and HiFi shares (plain pandas frames and arrays; the pages draw them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from modhifi.fidelity import hifi_size
from modhifi.options import DEFAULT_METHOD, HIFI_LEVEL, Method
from modhifi.prune.apply import kept_inputs
from modhifi.prune.plan import PrunePlan

if TYPE_CHECKING:  # the analysis imports nothing from here
    from modhifi.prune.analysis import Analysis


def score_table(analysis: Analysis, plan: PrunePlan | None = None) -> pd.DataFrame:
    """Long table: layer, out_channel, in_channel, singleton_fidelity, saliency (, kept)."""
    frames = []
    for name, fidelity in analysis.fidelity.items():
        c_out, c_in = fidelity.singleton.shape
        frame = pd.DataFrame({
            "layer": name,
            "out_channel": torch.arange(c_out).repeat_interleave(c_in).numpy(),
            "in_channel": torch.arange(c_in).repeat(c_out).numpy(),
            "singleton_fidelity": fidelity.singleton.flatten().cpu().numpy(),
            "saliency": fidelity.saliency.flatten().cpu().numpy()})
        if plan is not None:
            kept = _kept(analysis, plan).get(name)
            frame["kept"] = True if kept is None else frame["in_channel"].isin(kept.tolist())
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def channel_table(analysis: Analysis, plan: PrunePlan | None = None, *,
                  method: Method = DEFAULT_METHOD) -> pd.DataFrame:
    """One row per (consumer layer, input channel): its scores, keep priority and fate.

    Columns: layer, channel, singleton (best over the layer's outputs), saliency_share (mean
    over outputs of r_ci / E‖Y_c‖², the share of each output that channel i explains),
    priority (0 = the first channel its group keeps), kept (under `plan`, True if none).
    """
    rankings, position = analysis.ranking(method), {}
    for group in analysis.structure.groups:
        for name, index in group.consumers:
            position.update({(name, index[j]): rank
                             for rank, j in enumerate(rankings[group.name].order)})
    kept = _kept(analysis, plan) if plan else {}
    frames = []
    for name, fidelity in analysis.fidelity.items():
        c_in = fidelity.singleton.shape[1]
        share = fidelity.saliency / fidelity.energy.clamp(min=1e-30)[:, None]  # (c_out, c_in)
        frames.append(pd.DataFrame({
            "layer": name, "channel": range(c_in),
            "singleton": fidelity.singleton.max(0).values.cpu().numpy(),
            "saliency_share": share.mean(0).cpu().numpy(),
            "priority": [position.get((name, i), -1) for i in range(c_in)],
            "kept": [True] * c_in if name not in kept else
                    [i in set(kept[name].tolist()) for i in range(c_in)]}))
    return pd.concat(frames, ignore_index=True)


def layer_scores(analysis: Analysis, layer: str) -> dict[str, np.ndarray]:
    """(c_out, c_in) singleton fidelity and saliency share of one consumer layer."""
    fidelity = analysis.fidelity[layer]
    share = fidelity.saliency / fidelity.energy.clamp(min=1e-30)[:, None]
    return {"singleton": fidelity.singleton.cpu().numpy(), "saliency_share": share.cpu().numpy()}


def fidelity_curve(analysis: Analysis, layer: str, out_channel: int) -> pd.DataFrame:
    """FS(top-k) of one output channel against k, and which inputs the top-k adds."""
    fidelity = analysis.fidelity[layer]
    curve = fidelity.fidelity_curves()[out_channel]
    order = fidelity.singleton[out_channel].argsort(descending=True)
    return pd.DataFrame({"k": range(1, len(curve) + 1), "fidelity": curve.cpu().numpy(),
                         "added_channel": order.cpu().numpy()})


def layer_shape(module: nn.Module) -> str:
    """What a layer is, in words: "Conv2d 16→32, 3×3" or "Linear 64→10"."""
    if isinstance(module, nn.Conv2d):
        height, width = module.kernel_size
        return f"Conv2d {module.in_channels}→{module.out_channels}, {height}×{width}"
    return f"{type(module).__name__} {module.in_features}→{module.out_features}"


def hifi_table(analysis: Analysis, *, level: float = HIFI_LEVEL) -> pd.DataFrame:
    """Per consumer layer, in forward order: what it is, and the median over outputs of the
    smallest input share reaching `level`."""
    rows = [(name, layer_shape(analysis.model.get_submodule(name)), f.w.shape[1],
             float(hifi_size(f, level=level).median()))
            for name, f in analysis.fidelity.items()]
    return pd.DataFrame(rows, columns=["layer", "shape", "inputs", "hifi_share"])


def _kept(analysis: Analysis, plan: PrunePlan) -> dict[str, torch.Tensor]:
    return kept_inputs(analysis.structure, analysis.model, plan.removed_channels())
