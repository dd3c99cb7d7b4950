"""ModHiFi-U's gated class-direction edit, for networks whose head reads a token (a ViT's class
token): one neuron of the last feed-forward layer before the head becomes a gate that fires only
on the forget class's tokens and moves them off the class. The gate itself (`Gate`, `discriminant`,
`spare_neuron`, `moved_bias`) and the search of its threshold and strength (`search_gate`) are
shared with the text encoders' topic edit (`text.forget`).

1. **Statistics** (`class_direction`): one pass over the forget class's calibration images and a
   seeded reference sample of all classes records, at the positions that reach the head
   (`reaching_positions`: the class token), the FFN's inputs x (d_model,) and its down-projection's
   inputs a (d_ff,). Labels only pick the forget images.
2. **Direction**: the class's discriminant of the FFN inputs, v = (Σ + λ·mean diag Σ)⁻¹ (m_f − m)
   scaled so that vᵀ(m_f − m) = 1 (Σ, m: the reference's covariance and mean), the reference's
   scores s = vᵀ(x − m), and the class's offset of the down-projection's output d = W (ā_f − ā).
   The spare neuron j is the one whose replacement by its mean changes that output least on the
   reference: ‖W_{:j}‖²·Var(a_j).
3. **Gate** (`Gate`): g(x) = φ(κ(s(x) − τ)/σ)·σ/κ with φ the FFN's own activation, τ a quantile
   of the reference's scores and σ their spread: about max(s − τ, 0), zero on the tokens the
   class does not reach. Written into neuron j (up-projection row κ·v/σ, bias −κ(vᵀm + τ)/σ,
   down-projection column −α·d·σ/κ, and W_{:j}·E a_j moved into the down-projection's bias), it
   moves each token by −α·d·g(x) instead of what neuron j gave.
4. **Plan** (`plan_direction`): for each quantile of `GATE_QUANTILES`, the smallest strength α on
   `ALPHA_GRID` (refined) whose edit takes the forget class's calibration accuracy to the target;
   of the thresholds within `DIRECTION_SLACK` of the lowest forget accuracy, the one whose edit
   leaves most of the other classes' calibration predictions unchanged. Only the last FFN and
   what follows it run again (`modhifi.replay`).
5. **Edit** (`apply_direction`): the plan's gate written into a copy.

Why not the pair edits here: on `fmnist-vit` negating the most salient (output, input) pairs of
the last layers leaves 5 of 10 classes above 1% forget accuracy and costs 7.8 points of retain
accuracy (docs/results.md); what carries a class in the token is a direction spread over many
neurons. Why a gate rather than a rank-one change along that direction (the first version): a
linear edit moves every token in proportion to its score, so images of other classes that score
a little pay too; the gate leaves the tokens below its threshold alone.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modhifi.data import Split
from modhifi.errors import UserError
from modhifi.hooks import hooked, private_copy
from modhifi.options import (DIRECTION_RIDGE, DIRECTION_SLACK, DIRECTION_TARGET, GATE_QUANTILES,
                             GATE_SHARPNESS, REFERENCE_SAMPLES, UNLEARN_BATCH, Edit)
from modhifi.replay import Replay
from modhifi.trace import trace_forward
from modhifi.unlearn.layers import reaching_positions, unlearnable_layers
from modhifi.unlearn.scores import reference_index
from modhifi.unlearn.search import REPLAY_BYTES, smallest_passing

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


def spare_neuron(moments: Tensor, down: Tensor) -> tuple[int, float]:
    """(j, E a_j): the neuron whose replacement by its mean changes the down-projection's output
    least, ‖W_{:j}‖²·Var(a_j), from the reference's moments (3, d_ff) (count, Σ a, Σ a²) and the
    down-projection's weight W (d_model, d_ff)."""
    mean = moments[1] / moments[0]
    cost = (moments[2] / moments[0] - mean ** 2).clamp(min=0) * down.double().square().sum(0)
    j = int(cost.argmin())
    return j, float(mean[j])


@dataclass(frozen=True, eq=False)
class Gate:
    """What the spare neuron becomes: its reading v, centre m, threshold τ, scale σ and the
    offset d it removes (one gate, or one per cross-fitting fold stacked along a first
    dimension, as the text edit uses)."""

    quantile: float          # q: τ is this quantile of the reference's scores
    reading: Tensor          # ([folds,] d_model) v, scaled so that vᵀ(m_f − m) = 1 (float64)
    centre: Tensor           # ([folds,] d_model) m, the reference's mean FFN input
    threshold: Tensor        # ([folds]) τ
    scale: Tensor            # ([folds]) σ
    shift: Tensor            # ([folds,] d_model) d

    def gate(self, x: Tensor, activation: nn.Module, fold: Tensor | None = None) -> Tensor:
        """g(x) of FFN inputs (..., d_model) -> (...), in x's precision (the edited model's);
        with `fold` (B,) for x (B, T, d_model), each sample with its fold's gate."""
        v, m, tau, sigma = (t.to(x) for t in (self.reading, self.centre, self.threshold,
                                               self.scale))
        if fold is None:
            score = (x - m) @ v
        else:  # each sample its fold's: (B, 1, d_model) and (B, 1)
            fold = fold.to(x.device)
            v, m, tau, sigma = v[fold][:, None], m[fold][:, None], tau[fold][:, None], \
                sigma[fold][:, None]
            score = ((x - m) * v).sum(-1)
        return activation(GATE_SHARPNESS * (score - tau) / sigma) * sigma / GATE_SHARPNESS

    @torch.no_grad()
    def write(self, up: nn.Linear, down: nn.Linear, *, neuron: int, strength: float,
              bias: Tensor) -> None:
        """Neuron `neuron` of the FFN (up, down) becomes this gate at strength α, in place;
        `bias` (d_model,): the down-projection's bias with the neuron's mean output moved in."""
        kappa, sigma = GATE_SHARPNESS, float(self.scale)  # both have biases: class_direction
        up.weight[neuron] = (kappa * self.reading / sigma).to(up.weight)
        up.bias[neuron] = -kappa * float(self.reading @ self.centre + self.threshold) / sigma
        down.weight[:, neuron] = (-strength * self.shift * sigma / kappa).to(down.weight)
        down.bias.copy_(bias)


def weakest_strength(accuracy: Callable[[float], float], target: float, slack: float) -> float:
    """The smallest α of `ALPHA_GRID` (refined) with `accuracy(α)` ≤ `target`, or where no grid
    strength reaches it, ≤ the lowest accuracy any grid strength reaches plus `slack`: past the
    strength that moves the recognised samples the accuracy levels off, and more strength only
    costs the others. No strength (0) where the unedited model meets a positive target."""
    if target > 0 and accuracy(0.0) <= target:
        return 0.0
    aim = max(target, min(accuracy(alpha) for alpha in ALPHA_GRID) + slack)
    return smallest_passing(lambda alpha: accuracy(alpha) <= aim + 1e-12, ALPHA_GRID,
                            ALPHA_REFINE_STEPS)


@dataclass(frozen=True)
class GateChoice:
    """The gate a search kept, its strength and the figures it was chosen by."""

    gate: Gate
    strength: float                 # α
    forget_accuracy: float          # on the forget samples it was judged on, at α
    kept: float | None              # the other samples' predictions unchanged, at α


def search_gate(gates: Iterable[Gate], forget_accuracy: Callable[[Gate], Callable[[float], float]],
                kept: Callable[[Gate, float], float] | None, *, target: float,
                strength_slack: float, threshold_slack: float,
                strength: float | None = None) -> GateChoice:
    """The threshold and strength of the gate edit, shared by images and text. For each gate
    (one per threshold), the weakest strength that takes `forget_accuracy(gate)(α)` to `target`
    (`weakest_strength` with `strength_slack`), or `strength` when given; of the gates within
    `threshold_slack` of the lowest forget accuracy, the one whose edit `kept` most of the other
    samples' predictions (without `kept`: the first of them)."""
    options = []
    for gate in gates:
        # The strength search and the final figure ask for some strengths twice.
        accuracy = functools.cache(forget_accuracy(gate))
        alpha = weakest_strength(accuracy, target, strength_slack) if strength is None \
            else strength
        options.append(GateChoice(gate, alpha, accuracy(alpha),
                                  None if kept is None else kept(gate, alpha)))
    lowest = min(option.forget_accuracy for option in options)
    return max((option for option in options
                if option.forget_accuracy <= lowest + threshold_slack),
               key=lambda option: -1.0 if option.kept is None else option.kept)


@dataclass(frozen=True, eq=False)
class ClassDirection:
    """The forget class's direction at the last FFN before the head, and the spare neuron."""

    forget_class: int
    up: str                  # the FFN's up-projection (an nn.Linear)
    layer: str               # its down-projection
    reading: Tensor = field(repr=False)  # v (d_model,) float64
    centre: Tensor = field(repr=False)   # m (d_model,)
    scores: Tensor = field(repr=False)   # (n_reference · positions,) the reference's scores
    shift: Tensor = field(repr=False)    # d (d_model,): the class's offset of the FFN's output
    spare: int = 0                       # j
    spare_mean: float = 0.0              # E a_j on the reference

    def gate(self, quantile: float) -> Gate:
        """The gate whose threshold is this quantile of the reference's scores."""
        scores = self.scores
        return Gate(quantile, self.reading, self.centre,
                    scores.quantile(torch.tensor(quantile, dtype=scores.dtype)), scores.std(),
                    self.shift)


@dataclass(frozen=True, eq=False)
class DirectionPlan:
    """What the edit will change, shown before anything changes."""

    direction: ClassDirection = field(repr=False)
    gate: Gate = field(repr=False)
    strength: float                     # α
    calibration_forget_accuracy: float  # on the forget class's calibration images, at α
    calibration_retain_agreement: float | None = None  # other images' predictions unchanged
    edit: Edit = "direction"

    @property
    def forget_class(self) -> int:
        return self.direction.forget_class

    @property
    def layers(self) -> tuple[str, ...]:
        """The edited FFN, named by its down-projection (like `UnlearnPlan.layers`)."""
        return (self.direction.layer,)


def feeding_linear(model: nn.Module, layer: str, example: Tensor) -> str:
    """The Linear that runs last before `layer` and makes its inputs (an FFN's up-projection),
    found from one traced forward pass."""
    down = model.get_submodule(layer)
    trace = trace_forward(model, example)
    before = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and module.out_features == down.in_features
              and name in trace.end and trace.end[name] < trace.start[layer]]
    if not before:
        raise UserError(f"no Linear layer feeds {layer}: the class-direction edit needs a "
                        "feed-forward block (up-projection, activation, down-projection)")
    return max(before, key=trace.end.get)


def class_direction(model: nn.Module, calibration: Split, *, forget_class: int,
                    device: torch.device | str, ridge: float = DIRECTION_RIDGE,
                    reference_samples: int | None = REFERENCE_SAMPLES,
                    batch_size: int = UNLEARN_BATCH, seed: int = 0) -> ClassDirection:
    """The forget class's direction at the last FFN before the head (steps 1-2).

    Args:
        model: the trained network on `device`, in eval mode; only read.
        calibration: the calibration split; its labels only pick the forget class's images.
        reference_samples: calibration images of all classes (seeded) that give Σ and m.

    Raises:
        UserError: fewer than 2 forget-class images, no feed-forward block before the head, one
            without biases, or none of its outputs reaching the logits.
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
    up = feeding_linear(model, layer, example)
    unbiased = [name for name in (up, layer) if model.get_submodule(name).bias is None]
    if unbiased:  # the gate writes its threshold and its shift into them
        raise UserError(f"{' and '.join(unbiased)} ha{'s' if len(unbiased) == 1 else 've'} no "
                        "bias, which the class-direction gate is written into (an edited model "
                        "would not reload): use the pair edits (`unlearn`, edit zero or negate)")
    positions = reaching_positions(model, layer, example, seed=seed)
    if positions is not None and not len(positions):
        raise UserError(f"no output of {layer} reaches the logits (is the head untrained, all "
                        "zeros?): there is no class to move off")
    rows: dict[str, list[Tensor]] = {up: [], layer: []}

    def record(name: str):
        def hook(module, args):  # args[0]: (B, T, d) or (B, d)
            x = args[0].flatten(1, -2) if args[0].dim() > 2 else args[0][:, None]
            rows[name].append((x if positions is None else x[:, positions]).flatten(0, 1)
                              .double())
        return hook

    parts = {}
    with torch.no_grad(), hooked(model, before={up: record(up), layer: record(layer)}) as run:
        for name, index in (("forget", forget), ("reference", reference_index(
                len(calibration), reference_samples, seed))):
            for recorded in rows.values():
                recorded.clear()
            for images in calibration.subset(index).batches(batch_size, device=device):
                run(images)
            parts[name] = {key: torch.cat(value) for key, value in rows.items()}
    # (samples · positions, d_model) FFN inputs x and (…, d_ff) down-projection inputs a
    x, a = parts["reference"][up], parts["reference"][layer]
    v, m, _ = discriminant(x, parts["forget"][up].mean(0), ridge)
    W = model.get_submodule(layer).weight.detach()  # (d_model, d_ff)
    moments = torch.stack([torch.full_like(a[0], len(a)), a.sum(0), (a * a).sum(0)])
    spare, spare_mean = spare_neuron(moments, W)
    return ClassDirection(forget_class, up, layer, v, m, ((x - m) @ v).cpu(),
                          W.double() @ (parts["forget"][layer].mean(0) - a.mean(0)), spare,
                          spare_mean)


def apply_direction(model: nn.Module, plan: DirectionPlan) -> nn.Module:
    """A copy of `model` with the plan's gate written in (step 5); `model` is not touched."""
    copy = private_copy(model)
    _write(copy, plan.direction, plan.gate, plan.strength, _moved_bias(copy, plan.direction))
    return copy


def moved_bias(down: nn.Linear, neuron: int, mean: float) -> Tensor:
    """(d_model,) the unedited down-projection's bias with `neuron`'s mean output moved in (taken
    before the gate overwrites the neuron's column)."""
    bias = torch.zeros_like(down.weight[:, 0]) if down.bias is None else down.bias
    return (bias + down.weight[:, neuron] * mean).detach().clone()


def _moved_bias(model: nn.Module, direction: ClassDirection) -> Tensor:
    return moved_bias(model.get_submodule(direction.layer), direction.spare, direction.spare_mean)


def _write(model: nn.Module, direction: ClassDirection, gate: Gate, strength: float,
           bias: Tensor) -> None:
    """The gate at strength α written into `model` (a private copy), in place."""
    gate.write(model.get_submodule(direction.up), model.get_submodule(direction.layer),
               neuron=direction.spare, strength=strength, bias=bias)


def plan_direction(model: nn.Module, direction: ClassDirection, calibration: Split, *,
                   device: torch.device | str, target: float = DIRECTION_TARGET,
                   retain_images: Split | None = None,
                   batch_size: int = UNLEARN_BATCH) -> DirectionPlan:
    """The gate's threshold and strength (step 4): with `retain_images` (calibration images of
    the other classes, `search.other_classes`), the threshold whose edit changes fewest of their
    predictions among those that forget about as well as the best; without, the one that
    forgets best. Each evaluation replays the network up to the FFN (`modhifi.replay`)."""
    forget_images = calibration.subset(calibration.labels == direction.forget_class)
    both = [forget_images] + ([retain_images] if retain_images is not None else [])
    images = forget_images.normalise(
        torch.cat([split.images.to(device) for split in both]))  # (n_f + n_r, C, H, W)
    replay = Replay(model, images, [direction.up], batch_size=batch_size,
                    max_bytes=REPLAY_BYTES)
    bias = _moved_bias(replay.model, direction)
    forget = torch.arange(len(forget_images))
    retain = torch.arange(len(forget_images), len(images))
    with replay.before(direction.up) as run:
        def predictions(index: Tensor) -> Tensor:  # (len(index),) in the same batches every time
            parts = [run(index[start:start + batch_size]).argmax(1).cpu()
                     for start in range(0, len(index), batch_size)]
            return torch.cat(parts) if parts else index  # no retain images: nothing to run

        dense = predictions(retain)  # before any edit: compared batch for batch with the edits'

        def predicted(gate: Gate, alpha: float, index: Tensor) -> Tensor:
            _write(replay.model, direction, gate, alpha, bias)
            return predictions(index)

        def accuracy(gate: Gate) -> Callable[[float], float]:
            return lambda alpha: float(
                (predicted(gate, alpha, forget) == direction.forget_class).double().mean())

        def kept(gate: Gate, alpha: float) -> float:
            return float((predicted(gate, alpha, retain) == dense).double().mean())

        choice = search_gate(map(direction.gate, GATE_QUANTILES), accuracy,
                             None if retain_images is None else kept, target=target,
                             strength_slack=DIRECTION_SLACK, threshold_slack=DIRECTION_SLACK)
    return DirectionPlan(direction, choice.gate, choice.strength, choice.forget_accuracy,
                         choice.kept)
