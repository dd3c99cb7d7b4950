"""Every user-facing choice and default, defined once (no torch import, so the CLI's --help is fast).

The library types its arguments with these `Literal`s, validates them with `check`, and the
CLI, the pages and the benchmarks list their choices with `choices`.
"""
from __future__ import annotations

from typing import Literal, get_args

from modhifi.errors import UserError

DeviceChoice = Literal["auto", "cpu", "cuda"]
Method = Literal["modhifi", "modhifi-greedy", "l1", "random", "activation"]
Compensation = Literal["refit", "rescale", "none"]
Allocation = Literal["uniform", "global"]
TargetKind = Literal["channels", "macs"]
Scope = Literal["all", "internal"]  # internal: leave channels shared by residual additions alone
Edit = Literal["zero", "negate"]
Score = Literal["contrastive", "centred"]

# What each choice means, for error messages and help texts.
_MEANING = {
    DeviceChoice: "device",
    Method: "method",
    Compensation: "compensation",
    Allocation: "allocation",
    TargetKind: "target kind",
    Scope: "scope",
    Edit: "edit",
    Score: "score",
}

HIFI_LEVEL = 0.8   # a HiFi set reaches this fidelity (paper §3)
HIFI_SHARE = 0.2   # "small": fewer than this share of a layer's inputs reach HIFI_LEVEL
CALIBRATION_CLI = 2000   # calibration images the CLI reads by default (or all, if fewer)
CALIBRATION_THEORY = 500  # the theory report's default


def choices(kind) -> tuple[str, ...]:
    """The values of a choice, e.g. choices(Method) -> ("modhifi", "modhifi-greedy", ...)."""
    return get_args(kind)


def default_compensation(method: str) -> str:
    """Refit for ModHiFi's selections, none for the baselines (they come without one)."""
    return "refit" if method.startswith("modhifi") else "none"


def check(kind, value: str) -> str:
    """`value` if it is one of `kind`'s choices, else a one-line UserError listing them."""
    if value not in get_args(kind):
        raise UserError(f"unknown {_MEANING[kind]} {value!r}: use {', '.join(get_args(kind))}")
    return value
