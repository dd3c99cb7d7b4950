"""Every user-facing choice and default, defined once (no torch import, so the CLI's --help is fast).

The library types its arguments with these `Literal`s, validates them with `check`, and the
CLI, the pages and the benchmarks list their choices with `choices`.
"""
from __future__ import annotations

from typing import Literal, get_args

from modhifi.errors import UserError

DeviceChoice = Literal["auto", "cpu", "cuda"]
Method = Literal["modhifi-greedy", "modhifi", "l1", "random", "activation"]  # default first
# sequential: the refit layer by layer on the pruned network's own inputs (`prune.apply`); about
# an analysis' worth of work, so the Prune page offers it as a comparison, not a choice.
Compensation = Literal["refit", "sequential", "rescale", "none"]
# the Prune page's: what a slider move can run
LIVE_COMPENSATIONS = tuple(c for c in get_args(Compensation) if c != "sequential")
# A text encoder's: its refit fits each consumer with its bias from per-token statistics; a
# sequential refit of MiniLM gained nothing (benchmarks/text_sequential_refit.py).
TextCompensation = Literal["refit", "rescale", "none"]
Allocation = Literal["uniform", "global"]
DEFAULT_ALLOCATION: Allocation = "uniform"
TargetKind = Literal["channels", "macs", "latency"]  # latency: measured (`prune.latency`)
Scope = Literal["all", "internal"]  # internal: leave channels shared by residual additions alone
Edit = Literal["zero", "negate", "direction"]
Score = Literal["contrastive", "centred"]
Component = Literal["ffn", "heads"]  # a text encoder's units: FFN neurons or attention heads
DEFAULT_COMPONENT: Component = "ffn"
# Greedy subset fidelity: at 2x / 3.2x fewer MACs of fmnist-resnet 0.6 / 2.3 points more accurate
# than the paper's union rule, for 0.5 s more analysis (docs/results.md); the Fidelity page shows
# why it keeps a channel (`prune.card.greedy_steps`).
DEFAULT_METHOD: Method = "modhifi-greedy"  # so the pages' pickers open on it

# What each choice means, for error messages and help texts.
_MEANING = {
    DeviceChoice: "device",
    Method: "method",
    Compensation: "compensation",
    TextCompensation: "compensation of a text encoder",
    Allocation: "allocation",
    TargetKind: "target kind",
    Scope: "scope",
    Edit: "edit",
    Score: "score",
    Component: "component",
}

# How each method is named on the pages and in help texts (the importances: `prune.importance`).
METHOD_LABELS = {"modhifi-greedy": "ModHiFi, greedy subset fidelity",
                 "modhifi": "ModHiFi (union of HiFi sets)",
                 "l1": "L1 filter norm", "random": "random", "activation": "activation magnitude"}
COMPONENT_LABELS = {"ffn": "FFN neurons", "heads": "attention heads"}

HIFI_LEVEL = 0.8   # a HiFi set reaches this fidelity (paper §3)
HIFI_SHARE = 0.2   # "small": fewer than this share of a layer's inputs reach HIFI_LEVEL
FLOOR = 0.05      # share of each channel group always kept
ROUND_TO = 8      # kept channels per group: a multiple of this (docs/results.md, "speed")
REFERENCE_SAMPLES = 1000  # ModHiFi-U: calibration images of all classes that centre the scores
RETAIN_SAMPLES = 512      # ModHiFi-U: other-class calibration images that judge retain damage
UNLEARN_BATCH = 128       # ModHiFi-U: images per forward pass
REFERENCE_TEXTS = 512     # ModHiFi-U on text: calibration texts of all categories behind the means
TOPIC_TARGET = 0.0        # ModHiFi-U on text: forget-category accuracy the strength aims for
TOPIC_SLACK = 0.01        # ModHiFi-U on text: how close to its lowest reachable accuracy, when the
#                           target is out of reach
GATE_SLACK = 0.02         # ModHiFi-U on text: how close a gate threshold's forget accuracy must come
#                           to the best threshold's to be chosen for what it keeps
GATE_QUANTILES = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)  # ModHiFi-U on text: the gate thresholds
#                           tried, as quantiles of the reference tokens' scores
GATE_SHARPNESS = 4.0      # ModHiFi-U on text: κ, the gate's slope at its threshold in units of σ
FOLDS = 5                 # ModHiFi-U on text: cross-fitting folds that choose the strength
TOPIC_RIDGE = 10.0        # ModHiFi-U on text: the discriminant's ridge, relative to the mean
#                           variance (10: a cross-fitted forget accuracy no higher than with 1
#                           on any fortunes category, lower on six of eight; docs/results.md)
DIRECTION_TARGET = 0.0    # ModHiFi-U, class-direction edit: forget-class calibration accuracy aimed
DIRECTION_SLACK = 0.002   # … how close to its lowest reachable one, when the target is out of reach
DIRECTION_RIDGE = 10.0    # … the discriminant's ridge, relative to the mean variance (as on text)
RETRAIN_REFERENCE_SECONDS = 10  # zoo models that train within this (CPU) are retrained as reference
CALIBRATION_CLI = 2000   # calibration images the CLI reads by default (or all, if fewer)
CALIBRATION_THEORY = 500  # the theory report's default
CALIBRATION_TEXT = 512   # calibration texts a text model's commands read by default
WHY_ROUND_TO = "1 keeps exact counts"
WHY_STEPS = "rounds of score, remove, compensate, recalibrate"


def choices(kind) -> tuple[str, ...]:
    """The values of a choice, e.g. choices(Method) -> ("modhifi-greedy", "modhifi", ...)."""
    return get_args(kind)


def default_compensation(method: str) -> str:
    """Refit for ModHiFi's selections, none for the baselines (they come without one)."""
    return "refit" if method.startswith("modhifi") else "none"


def check_whole(label: str, value, why: str) -> int:
    """`value` if it is a whole number ≥ 1, else a one-line UserError naming `label`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{label} {value!r} must be at least 1, a whole number ({why})")
    return value


def check_target(target: float) -> float:
    """`target` if it is a finite fraction in [0, 1), else a one-line UserError."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise UserError(f"target {target!r} must be in [0, 1): the fraction of channels, MACs "
                        "or latency to remove, e.g. --target 0.5")
    return target


def check_fraction(label: str, value, *, low_open: bool = False, why: str) -> float:
    """`value` as a float in [0, 1] ((0, 1] when `low_open`), else a one-line UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (0 < value <= 1 if low_open else 0 <= value <= 1):  # NaN fails both
        span = "(0, 1]" if low_open else "[0, 1]"
        raise UserError(f"{label} {value!r} is out of range: pass a fraction in {span} ({why})")
    return float(value)


WHY_K = ("the share of each layer's (output, input) pairs edited, e.g. --k 0.03; leave it out "
         "to choose it automatically")
WHY_FORGET_TARGET = "the highest forget-class accuracy the chosen k may leave, e.g. 0.05"
WHY_FLOOR = "the share of each channel group always kept"
WHY_OVERRIDE = "the share of that group removed whatever the target"


def check(kind, value: str) -> str:
    """`value` if it is one of `kind`'s choices, else a one-line UserError listing them."""
    if value not in get_args(kind):
        raise UserError(f"unknown {_MEANING[kind]} {value!r}: use {', '.join(get_args(kind))}")
    return value
