"""ModHiFi-U's class-direction edit, for networks whose head reads a token (a ViT's class token):
one rank-one change of the last feed-forward down-projection before the head.

1. **Statistics**: one pass over the forget class's calibration images and a seeded reference
   sample of all classes records the down-projection's inputs a (d_ff,) at the positions that
   reach the head (`reaching_positions`: the class token). Labels only pick the forget images.
2. **Direction** (`discriminant`): the class's discriminant w = (Σ + λ·mean diag Σ)⁻¹ (m_f − m),
   scaled so that wᵀ(m_f − m) = 1 (Σ, m: the reference's covariance and mean), and the class's
   offset of the down-projection's output d = W (m_f − m).
3. **Plan**: the strength α, the smallest on `ALPHA_GRID` (refined) whose edit takes the forget
   class's calibration accuracy to the target.
4. **Edit**: W ← W − α d wᵀ, b ← b + α d wᵀm on a copy, so that every token's output moves by
   −α·wᵀ(a − m)·d: about α times the class's own offset on its tokens, little on the others.

Why not the pair edits here: on `fmnist-vit` negating the most salient (output, input) pairs of
the last layers leaves 5 of 10 classes above 1% forget accuracy and costs 7.8 points of retain
accuracy (docs/results.md); what carries a class in the token is a direction spread over many
neurons, which one rank-one term removes. The text models' topic edit (`text.forget`) is the same
idea on sentence embeddings and shares `discriminant`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modhifi.audit import agreement
from modhifi.data import Split
from modhifi.errors import UserError
from modhifi.hooks import hooked, private_copy
from modhifi.options import (DIRECTION_RIDGE, DIRECTION_SLACK, DIRECTION_TARGET,
                             REFERENCE_SAMPLES, UNLEARN_BATCH, Edit)
from modhifi.unlearn.layers import reaching_positions, unlearnable_layers
from modhifi.unlearn.scores import reference_index
from modhifi.unlearn.search import smallest_passing

# Candidate strengths α: geometric with ratio √2 from 1/4 to 16 (α = 1 moves the forget samples'
# mean onto the mean of all), the first that passes refined by 4 bisection steps in log α.
ALPHA_GRID: tuple[float, ...] = tuple(0.25 * 2 ** (j / 2) for j in range(13))
ALPHA_REFINE_STEPS = 4


def discriminant(reference: Tensor, forget_mean: Tensor, ridge: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(w, m, variance) from reference rows (n, d) and the forget rows' mean (d,): m the
    reference mean, w = (Σ + ridge·mean(variance)·I)⁻¹ (forget_mean − m) / gapᵀ(…), so wᵀgap = 1."""
    m = reference.mean(0)
    centred = reference - m
    covariance = centred.T @ centred / len(reference)  # (d, d)
    variance = covariance.diagonal().clone()
    covariance.diagonal().add_(ridge * float(variance.mean()))
    gap = forget_mean - m
    w = torch.linalg.solve(covariance, gap)
    return w / (gap @ w), m, variance  # positive definite: gapᵀw > 0 unless the gap is 0


@dataclass(frozen=True, eq=False)
class ClassDirection:
    """The forget class's direction in the inputs of one down-projection."""

    forget_class: int
    layer: str             # the down-projection (an nn.Linear)
    weight: Tensor = field(repr=False)  # w (d_ff,) float64
    centre: Tensor = field(repr=False)  # m (d_ff,)
    shift: Tensor = field(repr=False)   # d (d_model,): the class's offset of the layer's output

    def rank_one(self, strength: float) -> tuple[Tensor, Tensor]:
        """(ΔW (d_model, d_ff), Δb (d_model,)) of the layer at strength α, float64."""
        d = strength * self.shift
        return -torch.outer(d, self.weight), d * (self.weight @ self.centre)


@dataclass(frozen=True, eq=False)
class DirectionPlan:
    """What the edit will change, shown before anything changes."""

    direction: ClassDirection = field(repr=False)
    strength: float                     # α
    calibration_forget_accuracy: float  # on the forget class's calibration images, at α
    calibration_retain_agreement: float | None = None  # other images' predictions unchanged
    edit: Edit = "direction"

    @property
    def forget_class(self) -> int:
        return self.direction.forget_class

    @property
    def layers(self) -> tuple[str, ...]:
        """The edited layer, as a one-name tuple (like `UnlearnPlan.layers`)."""
        return (self.direction.layer,)


def class_direction(model: nn.Module, calibration: Split, *, forget_class: int,
                    device: torch.device | str, ridge: float = DIRECTION_RIDGE,
                    reference_samples: int | None = REFERENCE_SAMPLES,
                    batch_size: int = UNLEARN_BATCH, seed: int = 0) -> ClassDirection:
    """The forget class's direction at the last down-projection before the head (steps 1-2).

    Args:
        model: the trained network on `device`, in eval mode; only read.
        calibration: the calibration split; its labels only pick the forget class's images.
        reference_samples: calibration images of all classes (seeded) that give Σ and m.

    Raises:
        UserError: fewer than 2 forget-class images, no Linear layer before the head, or none
            of its outputs reaching the logits.
    """
    forget = (calibration.labels == forget_class).nonzero()[:, 0]
    if len(forget) < 2:
        raise UserError(f"the calibration set has {len(forget)} image(s) of class "
                        f"{forget_class}: the edit needs at least 2; give more calibration images")
    example = next(calibration.batches(1, device=device))
    layer = unlearnable_layers(model, example, layers=1, edit="negate")[-1]
    if not isinstance(model.get_submodule(layer), nn.Linear):
        raise UserError(f"the last layer before the head, {layer}, is not a Linear layer: "
                        "the class-direction edit is for Transformers; use the pair edits "
                        "(`unlearn`, edit zero or negate)")
    positions = reaching_positions(model, layer, example, seed=seed)
    if positions is not None and not len(positions):
        raise UserError(f"no output of {layer} reaches the logits (is the head untrained, all "
                        "zeros?): there is no class to move off")
    rows: list[Tensor] = []

    def record(module, args):  # args[0]: (B, T, d_ff) or (B, d_ff)
        a = args[0].flatten(1, -2) if args[0].dim() > 2 else args[0][:, None]
        rows.append((a if positions is None else a[:, positions]).flatten(0, 1).double())

    parts = {}
    with torch.no_grad(), hooked(model, before={layer: record}) as run:
        for name, index in (("forget", forget), ("reference", reference_index(
                len(calibration), reference_samples, seed))):
            rows.clear()
            for images in calibration.subset(index).batches(batch_size, device=device):
                run(images)
            parts[name] = torch.cat(rows)  # (samples · positions, d_ff)
    w, m, _ = discriminant(parts["reference"], parts["forget"].mean(0), ridge)
    W = model.get_submodule(layer).weight.detach().double()  # (d_model, d_ff)
    return ClassDirection(forget_class, layer, w, m, W @ (parts["forget"].mean(0) - m))


def apply_direction(model: nn.Module, plan: DirectionPlan) -> nn.Module:
    """A copy of `model` with the plan's rank-one edit (step 4); `model` is not touched."""
    return _edited(model, plan.direction, plan.strength)


def _edited(model: nn.Module, direction: ClassDirection, strength: float) -> nn.Module:
    copy = private_copy(model)
    layer = copy.get_submodule(direction.layer)
    delta_w, delta_b = direction.rank_one(strength)
    with torch.no_grad():
        layer.weight += delta_w.to(layer.weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(delta_b.to(layer.weight))
        else:
            layer.bias += delta_b.to(layer.bias)
    return copy


def plan_direction(model: nn.Module, direction: ClassDirection, calibration: Split, *,
                   device: torch.device | str, target: float = DIRECTION_TARGET,
                   retain_images: Split | None = None,
                   batch_size: int = UNLEARN_BATCH) -> DirectionPlan:
    """The smallest strength whose edit takes the forget class's calibration accuracy to ≤
    `target` (`weakest_strength`; step 3); with `retain_images` (calibration images of the other
    classes, `search.other_classes`), the share of their predictions the edit leaves unchanged."""
    images = calibration.subset(calibration.labels == direction.forget_class)

    @functools.cache  # the strength search and the plan ask for some strengths twice
    @torch.no_grad()
    def accuracy(alpha: float) -> float:
        copy = _edited(model, direction, alpha)
        predicted = torch.cat([copy(x).argmax(1).cpu()
                               for x in images.batches(batch_size, device=device)])
        return float((predicted == direction.forget_class).double().mean())

    strength = weakest_strength(accuracy, target, DIRECTION_SLACK)
    unchanged = None if retain_images is None else agreement(
        _edited(model, direction, strength), model, retain_images,
        forget_class=direction.forget_class, device=device, batch_size=batch_size).retain
    return DirectionPlan(direction, strength, accuracy(strength), unchanged)


def weakest_strength(accuracy: Callable[[float], float], target: float, slack: float) -> float:
    """The smallest α of `ALPHA_GRID` (refined) with `accuracy(α)` ≤ `target`, or where no grid
    strength reaches it, ≤ the lowest accuracy any grid strength reaches plus `slack`: past the
    strength that moves the recognised samples the accuracy levels off (samples the direction
    scores below the mean are moved the wrong way), and more strength only costs the others."""
    aim = max(target, min(accuracy(alpha) for alpha in ALPHA_GRID) + slack)
    return smallest_passing(lambda alpha: accuracy(alpha) <= aim + 1e-12, ALPHA_GRID,
                            ALPHA_REFINE_STEPS)
