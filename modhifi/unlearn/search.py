"""The search of the unlearning plan (method.md §4.3): for each number of edited layers, the
smallest k that forgets the forget-class calibration images, and the layer count that changes the
fewest predictions on the other classes. The test split is never looked at.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from modhifi.data import Split
from modhifi.options import RETAIN_SAMPLES, UNLEARN_BATCH, Edit
from modhifi.replay import Replay
from modhifi.unlearn.plan import UnlearnPlan, edit_in_place, plan_unlearning
from modhifi.unlearn.scores import ForgetScores, reference_index


# Candidate k (share of a layer's (output, input) pairs) for the automatic choice: geometric with
# ratio √2 from 0.25% to 25% (the forget accuracy is not monotone in k, so the grid is fine); the
# first grid point that reaches the target is refined by bisection.
K_GRID: tuple[float, ...] = tuple(round(0.0025 * 2 ** (j / 2), 6) for j in range(14)) + (0.25,)
K_REFINE_STEPS = 3  # bisection steps in log k: within 2^(1/16) ≈ 4.4% of the best passing k
# (2^(1/8) when the first grid point already passes: the bisection then starts from half of it)
# The plan edits K_MARGIN times the smallest k that forgets the calibration images: at that k some
# of them sit on the decision boundary, and unseen images of the class cross it. Chosen on
# fmnist-resnet with the calibration split halved (choose on one half, measure on the other):
# forget accuracy on the unseen half ≤ 1.6% without the margin, 0% for every class with 2^(1/4),
# at +0.5 points of mean retain drop.
K_MARGIN = 2 ** 0.25
REPLAY_BYTES = 2**30  # at most 1 GiB of recorded activations for the search of k


class EditSearch:
    """Counts what an edit does on forget- and retain-class calibration images: the scored layers
    of a private copy are edited in place, the modules before them replayed (`modhifi.replay`).

    Args:
        model: the original network, in eval mode; only read.
        scores: the forget-class scores whose layers the plans edit.
        forget_images: forget-class calibration samples.
        retain_images: calibration samples of the other classes (labels unread), or None.
        device: where the evaluations run.
        batch_size: images per forward pass while recording.
    """

    def __init__(self, model: nn.Module, scores: ForgetScores, forget_images: Split,
                 retain_images: Split | None, *, device: torch.device | str, batch_size: int):
        both = [forget_images] + ([retain_images] if retain_images is not None else [])
        images = forget_images.normalise(
            torch.cat([split.images.to(device) for split in both]))  # (n_f + n_r, C, H, W)
        self.first = scores.layers[0]
        self.replay = Replay(model, images, [self.first], batch_size=batch_size,
                             max_bytes=REPLAY_BYTES)
        self.originals = {name: self.replay.model.get_submodule(name).weight.detach().clone()
                          for name in scores.layers}
        self.forget_class = scores.forget_class
        self.forget = torch.arange(len(forget_images))  # hardest images (survived) first
        self.retain = torch.arange(len(forget_images), len(images))
        self.chunk = min(batch_size, 64)  # small batches so that a failing edit stops early
        self.original = self._predict(self.retain)  # (n_r,) what the unedited model says
        self.seen: dict[tuple, int | None] = {}

    def _predict(self, index: Tensor) -> Tensor:
        with self.replay.before(self.first) as run:
            predicted = [run(part).argmax(1).cpu() for part in index.split(self.chunk)]
        return torch.cat(predicted) if predicted else index

    def recognised(self, plan: UnlearnPlan, *, cap: int, among: Tensor | None = None) -> int | None:
        """How many forget images the edited model still classifies as the forget class.

        Counting stops (None) once more than `cap` are; without `among`, all forget images are
        tried, those that survived an earlier edit first.
        """
        key = (plan.layers, tuple(len(layer.pairs) for layer in plan.edits), cap)
        if among is None and key in self.seen:
            return self.seen[key]
        edit_in_place(self.replay.model, plan, self.originals)
        survivors, count = [], 0
        with self.replay.before(self.first) as run:
            for index in (self.forget if among is None else among).split(self.chunk):
                hit = run(index).argmax(1).cpu() == self.forget_class  # (b,)
                survivors.append(index[hit])
                count += int(hit.sum())
                if count > cap:
                    break
        if among is None:
            survived = torch.cat(survivors)
            self.forget = torch.cat([survived, self.forget[~torch.isin(self.forget, survived)]])
            self.seen[key] = count if count <= cap else None
        return count if count <= cap else None

    def agreement(self, plan: UnlearnPlan) -> float:
        """Share of the retain images on which the edited model predicts what the original did."""
        edit_in_place(self.replay.model, plan, self.originals)
        return float((self._predict(self.retain) == self.original).float().mean())


def other_classes(calibration: Split, *, forget_class: int, samples: int | None = RETAIN_SAMPLES,
                  seed: int = 0) -> Split:
    """A seeded sample of the calibration images that are not of the forget class.

    Args:
        calibration: the calibration split; its labels are only compared with `forget_class`.
        forget_class: the class to forget.
        samples: how many (None or more than there are: all of them).
        seed: for the sample.

    Returns:
        The sample, in calibration order.
    """
    others = (calibration.labels != forget_class).nonzero().squeeze(1)
    return calibration.subset(others[reference_index(len(others), samples, seed)])


def smallest_passing(passes, grid: tuple[float, ...], refine: int) -> float | None:
    """The smallest k of `grid` for which `passes(k)`, refined by bisection in log k towards the
    grid point below (None when no grid point passes)."""
    i = next((i for i, k in enumerate(grid) if passes(k)), None)
    if i is None:
        return None
    hi = grid[i]
    lo = grid[i - 1] if i else hi / 2
    for _ in range(refine):
        middle = math.sqrt(lo * hi)
        lo, hi = (middle, hi) if not passes(middle) else (lo, middle)
    return hi


def choose_plan(model: nn.Module, scores: ForgetScores, forget_images: Split, *, edit: Edit,
                target: float = 0.0, retain_images: Split | None = None,
                layer_counts: tuple[int, ...] | None = None, device: torch.device | str,
                batch_size: int = UNLEARN_BATCH, grid: tuple[float, ...] = K_GRID,
                refine: int = K_REFINE_STEPS, margin: float = K_MARGIN) -> UnlearnPlan:
    """The plan that forgets on calibration images: how many layers, and k for them.

    For each number L of last layers: the smallest k whose edit takes the accuracy on
    `forget_images` to ≤ `target` (the grid scanned upwards, then bisection in log k between
    the last failing and the first passing grid point), times `margin` unless that breaks the
    target. Of the L that reach the target, the one whose edit changes the fewest predictions on
    `retain_images` (agreement with the unedited model, so no labels are read) wins; ties and
    the absence of retain images go to fewer layers. When no L reaches the target, the (L, k)
    that leaves the fewest of a seeded sample of 256 forget images recognised is returned. Only
    the edited layers and what follows them are recomputed, and an evaluation stops as soon as
    more than `target` of the images are still recognised.

    Args:
        model: the original network, in eval mode; not modified (a working copy is edited).
        scores: from `score_forget_class`, for the largest candidate set of layers.
        forget_images: the forget-class calibration samples (never the test split).
        edit: `zero` or `negate`.
        target: the highest acceptable accuracy on `forget_images`, in [0, 1].
        retain_images: calibration samples of the other classes (their labels are not read).
        layer_counts: the candidate L, each ≤ len(scores.layers); None = all of scores.layers.
        device: where the evaluations run.
        batch_size: images per forward pass.
        grid: increasing candidate k.
        refine: bisection steps after the grid scan.
        margin: factor (≥ 1) on the smallest passing k, so unseen images are forgotten too.

    Returns:
        The chosen `UnlearnPlan`, with its calibration forget accuracy and retain agreement.
    """
    counts = layer_counts or (len(scores.layers),)
    search = EditSearch(model, scores, forget_images, retain_images, device=device,
                     batch_size=batch_size)
    n = len(forget_images)
    allowed = math.floor(target * n + 1e-9)  # images that may stay recognised

    def plan(count: int, k: float) -> UnlearnPlan:
        return plan_unlearning(scores.last(count), k=k, edit=edit)

    def passes(count: int, k: float) -> bool:
        return search.recognised(plan(count, k), cap=allowed) is not None

    reached = []
    for count in counts:
        k = smallest_passing(lambda k: passes(count, k), grid, refine)
        if k is not None:  # with the margin unless that breaks the target (k is not monotone)
            reached.append(plan(count, min(1.0, k * margin) if passes(count, min(1.0, k * margin))
                                else k))
    if reached:
        chosen = reached[0] if retain_images is None or len(reached) == 1 else max(
            reached, key=search.agreement)
    else:  # the target is out of reach: the edit that forgets most, on a seeded sample
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256]
        chosen = min((plan(count, k) for count in counts for k in grid),
                     key=lambda p: search.recognised(p, cap=n, among=sample))
    forget_accuracy = search.recognised(chosen, cap=n, among=torch.arange(n)) / n
    agreement = search.agreement(chosen) if retain_images is not None else None
    return replace(chosen, calibration_forget_accuracy=forget_accuracy,
                   calibration_retain_agreement=agreement)

