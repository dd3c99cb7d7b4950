"""What a caller asks the library for, as frozen values: which model (`ModelRef`), how to prune
it (`PruneRequest`, `TextPruneRequest`) and which class to forget (`UnlearnRequest`,
`TextUnlearnRequest`).

Each is checked once, when it is made, with `modhifi.options` (a bad value is a one-line
`UserError` naming the problem and the fix); each is hashable and equal by value, so the
dashboard keys its caches on it; each gives the keyword arguments of the library call it stands
for, so a caller passes one value instead of many positional ones. No torch import.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from modhifi.errors import UserError
from modhifi.options import (DEFAULT_ALLOCATION, DEFAULT_COMPONENT, DEFAULT_METHOD, FLOOR,
                             REFERENCE_SAMPLES, RETAIN_SAMPLES, ROUND_TO, TOPIC_TARGET,
                             UNLEARN_BATCH, WHY_FLOOR, WHY_FORGET_TARGET, WHY_K, WHY_OVERRIDE,
                             WHY_ROUND_TO, Allocation, Compensation, Component, Edit, Method, Scope,
                             Score, TargetKind, TextCompensation, check, check_fraction,
                             check_target, check_whole, default_compensation)

SEPARATOR = "|"  # ModelRef's string form: NAME, or PATH|ARCH|DATA (ARCH may be empty)
_MODEL_FORM = ("use a zoo name (e.g. digits-cnn) or PATH|ARCH|DATA "
               "(e.g. model.pt|resnet18|cifar10:/data/cifar)")


def _whole_or_none(label: str, value, why: str) -> None:
    if value is not None:
        check_whole(label, value, why)


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed {seed!r} must be a whole number ≥ 0, e.g. 0")


@dataclass(frozen=True)
class ModelRef:
    """Which model: a zoo name, or a checkpoint path with its architecture and dataset.

    `str(ref)` is `NAME` or `PATH|ARCH|DATA` (ARCH or DATA empty when not given), and
    `ModelRef.parse` reads it back: the one place that form is written and read.
    """

    spec: str                                          # zoo name or checkpoint path
    arch: str | None = field(default=None, kw_only=True)  # torchvision builder of a checkpoint
    data: str | None = field(default=None, kw_only=True)  # dataset of a checkpoint

    def __post_init__(self):
        for name in ("arch", "data"):  # "" (an empty form field) means "not given"
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise UserError(f"model {self.spec!r} names no model: {_MODEL_FORM}")
        for name in ("spec", "arch", "data"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or SEPARATOR in value):
                raise UserError(f"model {name} {value!r} must be text without {SEPARATOR!r}: "
                                f"{_MODEL_FORM}")

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """The model named by `str(ref)`'s form: `NAME` or `PATH|ARCH|DATA`."""
        parts = text.split(SEPARATOR) if isinstance(text, str) else []
        if len(parts) not in (1, 3):
            raise UserError(f"model {text!r} is neither a name nor PATH|ARCH|DATA: {_MODEL_FORM}")
        spec, arch, data = parts if len(parts) == 3 else (parts[0], None, None)
        return cls(spec, arch=arch, data=data)

    def __str__(self) -> str:
        if self.arch is None and self.data is None:
            return self.spec
        return SEPARATOR.join((self.spec, self.arch or "", self.data or ""))

    def open_kwargs(self) -> dict:
        """Keyword arguments of `zoo.open_subject` (add `device=`)."""
        return {"spec": self.spec, "arch": self.arch, "data": self.data}


@dataclass(frozen=True, kw_only=True)
class PruneRequest:
    """One pruning: what `Analysis.plan` and `Analysis.apply` are asked (their defaults).

    `compensation` left out is `options.default_compensation(method)`: refit for ModHiFi's
    selections, none for the baselines.
    """

    target: float                          # fraction in [0, 1) of channels or MACs to remove
    target_kind: TargetKind = "channels"
    allocation: Allocation = DEFAULT_ALLOCATION
    method: Method = DEFAULT_METHOD
    scope: Scope = "all"
    floor: float = FLOOR                   # fraction of each group always kept
    round_to: int = ROUND_TO               # kept channels per group: a multiple of this
    seed: int = 0                          # of the random baseline
    compensation: Compensation | None = None
    recalibrate: bool = True               # BatchNorm statistics re-estimated after the cut
    overrides: tuple[tuple[str, float], ...] = ()  # (group, share removed whatever the target)

    def __post_init__(self):
        object.__setattr__(self, "target", float(check_target(self.target)))
        check(TargetKind, self.target_kind)
        check(Allocation, self.allocation)
        check(Method, self.method)
        check(Scope, self.scope)
        object.__setattr__(self, "floor", check_fraction("floor", self.floor, why=WHY_FLOOR))
        check_whole("round_to", self.round_to, WHY_ROUND_TO)
        _check_seed(self.seed)
        if self.compensation is None:
            object.__setattr__(self, "compensation", default_compensation(self.method))
        check(Compensation, self.compensation)
        if not isinstance(self.recalibrate, bool):
            raise UserError(f"recalibrate {self.recalibrate!r} must be True or False")
        object.__setattr__(self, "overrides", tuple(
            (str(group), check_fraction(f"override of {group}", share, why=WHY_OVERRIDE))
            for group, share in self.overrides))

    def plan_kwargs(self) -> dict:
        """Keyword arguments of `Analysis.plan`."""
        return {"target": self.target, "target_kind": self.target_kind,
                "allocation": self.allocation, "method": self.method, "scope": self.scope,
                "floor": self.floor, "round_to": self.round_to, "seed": self.seed,
                "overrides": dict(self.overrides) or None}

    def apply_kwargs(self) -> dict:
        """Keyword arguments of `Analysis.apply` (add the plan)."""
        return {"compensation": self.compensation, "recalibrate": self.recalibrate}


@dataclass(frozen=True, kw_only=True)
class TextPruneRequest:
    """One pruning of a text encoder: what `TextAnalysis.plan` and `apply_plan` are asked."""

    target: float                          # fraction in [0, 1) of the components or of the MACs
    components: Component = DEFAULT_COMPONENT
    target_kind: TargetKind = "channels"
    method: Method = DEFAULT_METHOD
    compensation: TextCompensation | None = None

    def __post_init__(self):
        object.__setattr__(self, "target", float(check_target(self.target)))
        check(Component, self.components)
        check(TargetKind, self.target_kind)
        check(Method, self.method)
        if self.compensation is None:
            object.__setattr__(self, "compensation", default_compensation(self.method))
        check(TextCompensation, self.compensation)

    def command(self, model: str, samples: int) -> str:
        """The command line that makes this pruning of `model` with `samples` calibration texts
        (add `--out DIR` to save it)."""
        return (f"python -m modhifi prune --model {model} --target {self.target:g} --target-kind "
                f"{self.target_kind} --components {self.components} --method {self.method} "
                f"--compensation {self.compensation} --calib-samples {samples}")

    def plan_kwargs(self) -> dict:
        """Keyword arguments of `TextAnalysis.plan`."""
        return {"target": self.target, "kind": self.components, "target_kind": self.target_kind,
                "method": self.method}


@dataclass(frozen=True, kw_only=True)
class UnlearnRequest:
    """One forgetting: the options of `modhifi.unlearn.unlearn` (its defaults).

    Whether `forget_class` exists is known only with the dataset: `unlearn` checks that.
    """

    forget_class: int
    edit: Edit | None = None               # None: by architecture (`unlearn.automatic_edit`)
    # layers, k: the pair edits' (zero, negate); the direction edit takes neither
    layers: int | None = None              # last L layers edited; None: chosen with k
    k: float | None = None                 # share of (output, input) pairs; None: searched
    score: Score = "contrastive"
    target_forget_accuracy: float = 0.0    # what the searched k aims for (k None only)
    reference_samples: int | None = REFERENCE_SAMPLES  # centring the scores; None: all
    retain_samples: int | None = RETAIN_SAMPLES  # judging the layer count; None: all
    batch_size: int = UNLEARN_BATCH
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.forget_class, bool) or not isinstance(self.forget_class, int) or \
                self.forget_class < 0:
            raise UserError(f"forget class {self.forget_class!r} must be a class index ≥ 0, "
                            "e.g. --forget-class 3")
        if self.edit is not None:
            check(Edit, self.edit)
        if self.edit == "direction" and (self.layers is not None or self.k is not None):
            raise UserError("--layers and --k choose the pair edits; --edit direction edits one "
                            "neuron of the last feed-forward layer: leave them out")
        _whole_or_none("layers", self.layers, "how many of the last layers to edit; "
                       "leave it out to choose with k")
        if self.k is not None:
            object.__setattr__(self, "k", check_fraction("k", self.k, low_open=True, why=WHY_K))
        check(Score, self.score)
        object.__setattr__(self, "target_forget_accuracy", check_fraction(
            "target forget accuracy", self.target_forget_accuracy, why=WHY_FORGET_TARGET))
        if self.k is not None and self.target_forget_accuracy > 0:
            raise UserError("--forget-target steers the k chosen automatically, and --k gives "
                            "it: leave one of them out")
        _whole_or_none("reference samples", self.reference_samples, "or None for all")
        _whole_or_none("retain samples", self.retain_samples, "or None for all")
        check_whole("batch size", self.batch_size, "images per forward pass")
        _check_seed(self.seed)

    def kwargs(self) -> dict:
        """Keyword arguments of `modhifi.unlearn.unlearn` (add model, dataset and device)."""
        return {"forget_class": self.forget_class, "edit": self.edit, "layers": self.layers,
                "k": self.k, "score": self.score,
                "target_forget_accuracy": self.target_forget_accuracy,
                "reference_samples": self.reference_samples,
                "retain_samples": self.retain_samples, "batch_size": self.batch_size,
                "seed": self.seed}


@dataclass(frozen=True, kw_only=True)
class TextUnlearnRequest:
    """One forgetting of a text encoder's category: the options of
    `modhifi.text.forget.forget_category` (its defaults)."""

    category: int
    target: float = TOPIC_TARGET  # forget-category accuracy the strength aims for

    def __post_init__(self):
        if isinstance(self.category, bool) or not isinstance(self.category, int) or \
                self.category < 0:
            raise UserError(f"category {self.category!r} must be a category index ≥ 0, "
                            "e.g. --forget-class 1")
        object.__setattr__(self, "target", check_fraction("target forget accuracy", self.target,
                                                          why=WHY_FORGET_TARGET))

    def command(self, model: str, category: str) -> str:
        """The command line that makes this forgetting of `model`'s category named `category`
        (add `--out DIR` to save it)."""
        return (f"python -m modhifi unlearn --model {model} --forget-class {category} "
                f"--forget-target {self.target:g}")
