"""The unlearning plan and edit (method.md §4.3–4.4): the top-k (output, input) pairs of each
edited layer by forget-class saliency, zeroed or negated on a copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.hooks import private_copy
from modhifi.options import WHY_K, Edit, check, check_fraction
from modhifi.unlearn.scores import ForgetScores


@dataclass(frozen=True, eq=False)
class LayerEdit:
    """The kernel slices W[c, i] of one layer that the edit touches."""

    name: str
    shape: tuple[int, int]  # (c_out, c_in)
    pairs: Tensor  # (n, 2) long (output c, input i), largest saliency first
    saliency: Tensor  # (n,) their scores


@dataclass(frozen=True, eq=False)
class UnlearnPlan:
    """What the edit will change, shown before anything changes."""

    forget_class: int
    edit: Edit
    k: float  # share of each layer's c_out·c_in pairs
    edits: tuple[LayerEdit, ...]  # one per edited layer, in forward order
    calibration_forget_accuracy: float | None = None  # when chosen on calibration images
    calibration_retain_agreement: float | None = None  # share of retain predictions unchanged

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the edited layers."""
        return tuple(layer.name for layer in self.edits)

    def to_frame(self) -> pd.DataFrame:
        """One row per edited slice: layer, out_channel, in_channel, saliency, edit."""
        return pd.DataFrame([
            {"layer": layer.name, "out_channel": c, "in_channel": i, "saliency": r,
             "edit": self.edit}
            for layer in self.edits
            for (c, i), r in zip(layer.pairs.tolist(), layer.saliency.tolist())])


def _pairs_per_layer(shape: tuple[int, int], k: float) -> int:
    """How many of a layer's c_out·c_in pairs a share k selects (at least one)."""
    return max(1, round(k * shape[0] * shape[1]))


def plan_unlearning(scores: ForgetScores, *, k: float, edit: Edit = "zero") -> UnlearnPlan:
    """The top-k (output, input) pairs of every scored layer by saliency.

    Args:
        scores: from `score_forget_class`.
        k: share of each layer's c_out·c_in pairs, in (0, 1]; at least one pair per layer.
        edit: `zero` or `negate` the selected kernel slices.

    Returns:
        The `UnlearnPlan`.
    """
    check_fraction("k", k, low_open=True, why=WHY_K)
    check(Edit, edit)
    layers = []
    for name, r in zip(scores.layers, scores.saliency):
        shape = (r.shape[0], r.shape[1])
        top = r.flatten().topk(_pairs_per_layer(shape, k))  # sorted, largest first
        pairs = torch.stack([top.indices // shape[1], top.indices % shape[1]], dim=1)  # (n, 2)
        layers.append(LayerEdit(name, shape, pairs.cpu(), top.values.cpu()))
    return UnlearnPlan(scores.forget_class, edit, float(k), tuple(layers))



@torch.no_grad()
def edit_in_place(model: nn.Module, plan: UnlearnPlan,
                   originals: dict[str, Tensor] | None = None) -> None:
    """Write the plan into `model`'s weights, after restoring the layers of `originals` (name ->
    weight) when given."""
    for name, weight in (originals or {}).items():
        model.get_submodule(name).weight.copy_(weight)
    for layer in plan.edits:
        weight = model.get_submodule(layer.name).weight  # (c_out, c_in[, k, k])
        c, i = layer.pairs.to(weight.device).unbind(1)
        if plan.edit == "zero":
            weight[c, i] = 0
        else:
            weight[c, i] = -weight[c, i]


def apply_plan(model: nn.Module, plan: UnlearnPlan) -> nn.Module:
    """A new model with the plan's kernel slices zeroed or negated; the input model is untouched.

    Args:
        model: the original network.
        plan: from `plan_unlearning` or `choose_plan`.

    Returns:
        An edited deep copy, in eval mode.
    """
    edited = private_copy(model)
    edit_in_place(edited, plan)
    return edited
