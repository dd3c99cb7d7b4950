"""ModHiFi-U's entry point: `unlearn` runs statistics → scores → plan (with the search of k)
→ edit on a copy, then audits the model before and after (`modhifi.audit`, where labels are
allowed)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from modhifi.audit import (Audit, Outputs, audit, audit_frame, membership_samples, per_class_frame,
                           summary_keys)
from modhifi.data import Dataset
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.hooks import private_copy
from modhifi.options import REFERENCE_SAMPLES, RETAIN_SAMPLES, UNLEARN_BATCH, Edit, Score
from modhifi.requests import UnlearnRequest
from modhifi.unlearn.direction import (DirectionPlan, apply_direction, class_direction,
                                       plan_direction)
from modhifi.unlearn.layers import automatic_edit, default_edit, unlearnable_layers
from modhifi.unlearn.plan import UnlearnPlan, apply_plan, plan_unlearning
from modhifi.unlearn.scores import ForgetScores, score_forget_class
from modhifi.unlearn.search import choose_plan, other_classes


@dataclass(frozen=True, eq=False)
class UnlearnResult:
    """The edited model, what was changed, and the audit before and after."""

    model: nn.Module  # the edited copy
    scores: ForgetScores | None  # the pair edits' saliency (None for the direction edit)
    plan: UnlearnPlan | DirectionPlan
    before: Audit
    after: Audit
    seconds: float  # wall time of statistics + plan (including the choice of k) + edit
    classes: tuple[str, ...]

    def _audits(self, reference: Audit | None) -> dict[str, Audit]:
        return {"before": self.before, "after": self.after,
                **({} if reference is None else {"retrained": reference})}

    def to_frame(self, reference: Audit | None = None) -> pd.DataFrame:
        """One row per audit figure: metric, before, after, and `reference`'s (the model
        retrained without the class, say) as `retrained` when given."""
        return audit_frame(self._audits(reference))

    def per_class_frame(self, reference: Audit | None = None) -> pd.DataFrame:
        """One row per class: class, before, after (and retrained) test accuracy."""
        return per_class_frame(self.classes, self._audits(reference))

    def summary(self, *, model: str, device: str) -> dict:
        """The flat dict of the `unlearn` command (contract.md), given model and device names."""
        k = self.plan.k if isinstance(self.plan, UnlearnPlan) else None  # pairs only
        return {"model": model, "forget_class": self.plan.forget_class, "edit": self.plan.edit,
                "layers": len(self.plan.layers), "k": k, "device": device,
                **summary_keys(self.before, self.after), "seconds": self.seconds}


def unlearn(model: nn.Module, dataset: Dataset, *, forget_class: int, device: torch.device | str,
            edit: Edit | None = None, layers: int | None = None, k: float | None = None,
            score: Score = "contrastive", target_forget_accuracy: float = 0.0,
            reference_samples: int | None = REFERENCE_SAMPLES,
            retain_samples: int | None = RETAIN_SAMPLES, batch_size: int = UNLEARN_BATCH,
            seed: int = 0, before: Outputs | None = None, shard: Shard = ALONE) -> UnlearnResult:
    """Make `model` forget one class without fine-tuning (ModHiFi-U), and audit the result.

    Args:
        model: a trained classifier on `device`; not modified.
        dataset: its dataset (calibration samples drive the edit, test samples the audit).
        forget_class: index of the class to forget.
        device: where everything runs.
        edit: `zero` or `negate` the selected kernel slices, or `direction`: one neuron of the
            last feed-forward layer of a Transformer made a gate on the class's direction
            (`unlearn.direction`), its threshold and strength chosen for the target (`layers`,
            `k` and `score` are the pair edits' and do not apply). None: by architecture
            (`automatic_edit`: `direction` for Transformers), the pair edit by normalisation
            (`default_edit`) when `layers` or `k` is given.
        layers: how many of the last prunable layers before the classifier to edit; None =
            chosen with k (`choose_plan`) among 1..`MAX_LAYERS` (all `MAX_LAYERS` when k is
            given).
        k: share of each edited layer's (output, input) pairs, in (0, 1]; None chooses the
            smallest k that takes the forget-class calibration accuracy to the target.
        score: `contrastive` (default) or `centred` (`score_forget_class`).
        target_forget_accuracy: that target, in [0, 1] (only used when k is None).
        reference_samples: calibration samples of all classes that centre the scores (None: all).
        retain_samples: calibration samples of the other classes (seeded; labels unread beyond
            "not the forget class") whose changed predictions decide the number of layers; None =
            all of them.
        batch_size: images per forward pass.
        seed: for the reference sample and the membership attack.
        before: `model_outputs` of `model`, to reuse across forget classes.
        shard: when several processes share the work (`modhifi.distributed`): the forget-class
            statistics are read in shares and summed; the search of k (on a few hundred
            calibration images), the edit and the audit run alike on every process.

    Returns:
        The `UnlearnResult`; `seconds` times statistics, plan and edit, not the audits.
    """
    # Every option checked once, by the request; whether the class exists needs the dataset.
    UnlearnRequest(forget_class=forget_class, edit=edit, layers=layers, k=k, score=score,
                   target_forget_accuracy=target_forget_accuracy,
                   reference_samples=reference_samples, retain_samples=retain_samples,
                   batch_size=batch_size, seed=seed)
    classes = dataset.num_classes
    if not forget_class < classes:
        raise UserError(f"forget class {forget_class!r} is out of range for {dataset.name} "
                        f"({classes} classes): pass --forget-class 0..{classes - 1}")
    membership_samples(dataset, forget_class=forget_class, seed=seed)  # the audit can run

    begin = time.perf_counter()
    # eval() and hooks touch only this copy; channels-last convolutions are ~1.7x faster on a CPU
    original = private_copy(model).to(memory_format=torch.channels_last)
    example = next(dataset.calibration.batches(1, device=device))
    if edit is None:
        edit = automatic_edit(original, example) if layers is None and k is None \
            else default_edit(original)
    calibration = dataset.calibration
    retain = other_classes(calibration, forget_class=forget_class, samples=retain_samples,
                           seed=seed)
    if edit == "direction":
        direction = class_direction(original, calibration, forget_class=forget_class,
                                    device=device, reference_samples=reference_samples,
                                    batch_size=batch_size, seed=seed)
        plan = plan_direction(original, direction, calibration, device=device,
                              target=target_forget_accuracy, retain_images=retain,
                              batch_size=batch_size)
        edited, scores = apply_direction(model, plan), None
        return _audited(original, edited, scores, plan, begin, dataset, forget_class=forget_class,
                        device=device, batch_size=batch_size, seed=seed, before=before)
    names = unlearnable_layers(original, example, layers=layers, edit=edit)
    scores = score_forget_class(original, dataset.calibration, forget_class=forget_class,
                                layers=names, device=device, score=score,
                                reference_samples=reference_samples, batch_size=batch_size,
                                seed=seed, shard=shard)
    if k is None:
        plan = choose_plan(original, scores, calibration.subset(calibration.labels == forget_class),
                           edit=edit, target=target_forget_accuracy, retain_images=retain,
                           layer_counts=tuple(range(1, len(names) + 1)) if layers is None
                           else None, device=device, batch_size=batch_size)
    else:
        plan = plan_unlearning(scores, k=k, edit=edit)
    edited = apply_plan(model, plan)  # in the caller's memory format
    return _audited(original, edited, scores, plan, begin, dataset, forget_class=forget_class,
                    device=device, batch_size=batch_size, seed=seed, before=before)


def _audited(original: nn.Module, edited: nn.Module, scores: ForgetScores | None,
             plan: UnlearnPlan | DirectionPlan, begin: float, dataset: Dataset, *,
             forget_class: int, device: torch.device | str, batch_size: int, seed: int,
             before: Outputs | None) -> UnlearnResult:
    """The result, its seconds counted up to now (the audits are not), audited before and after."""
    seconds = time.perf_counter() - begin
    run = dict(forget_class=forget_class, device=device, batch_size=batch_size, seed=seed)
    return UnlearnResult(edited, scores, plan, audit(original, dataset, outputs=before, **run),
                         audit(edited, dataset, **run), seconds, dataset.classes)

