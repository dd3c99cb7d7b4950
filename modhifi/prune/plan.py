"""The plan (method.md §3.5): how many channels each group keeps, and which, for a target
fraction of channels, of MACs or of measured latency. A `PrunePlan` is a plain value, with the
exact MACs and parameters it leads to (and the latency a cost model predicts), shown before
anything changes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pandas as pd

from modhifi.errors import UserError
from modhifi.options import (DEFAULT_ALLOCATION, FLOOR, ROUND_TO, WHY_FLOOR, WHY_OVERRIDE,
                             WHY_ROUND_TO, Allocation, Scope, TargetKind, check, check_fraction,
                             check_target, check_whole)
from modhifi.prune.importance import Ranking
from modhifi.prune.latency import CostModel
from modhifi.prune.structure import Structure


@dataclass(frozen=True)
class GroupPlan:
    """One group's part of a plan."""

    name: str
    size: int
    kept: tuple[int, ...]       # sorted channel indices
    removed: tuple[int, ...]


@dataclass(frozen=True)
class PrunePlan:
    """What `apply` will do, computed before anything changes."""

    method: str
    target: float
    target_kind: TargetKind
    allocation: Allocation
    scope: Scope
    groups: tuple[GroupPlan, ...]  # the groups in scope; the others keep every channel
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    # Milliseconds per batch a cost model predicts (`prune.latency`): None when none was given.
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None

    @property
    def channels_before(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def channels_after(self) -> int:
        return sum(len(g.kept) for g in self.groups)

    @property
    def speedup_macs(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def speedup_planned(self) -> float | None:
        """The speed-up the cost model predicts (None without one)."""
        if self.latency_before_ms is None:
            return None
        return self.latency_before_ms / self.latency_after_ms

    @property
    def achieved(self) -> float:
        """The share of the target's quantity (channels, MACs or predicted latency) the plan
        removes: at least the target, more where kept channels are rounded up to multiples or a
        floor binds."""
        if self.target_kind == "macs":
            return 1 - self.macs_after / self.macs_before
        if self.target_kind == "latency":
            return 1 - self.latency_after_ms / self.latency_before_ms
        return 1 - self.channels_after / self.channels_before

    def removed_channels(self) -> dict[str, list[int]]:
        """group (first producer's name) -> removed channel indices, for export."""
        return {g.name: list(g.removed) for g in self.groups if g.removed}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"group": [g.name for g in self.groups],
                             "channels": [g.size for g in self.groups],
                             "kept": [len(g.kept) for g in self.groups],
                             "removed": [len(g.removed) for g in self.groups]})


def kept_counts(rankings: dict[str, Ranking], knob: float, allocation: Allocation,
                 floor: float, round_to: int,
                 overrides: Mapping[str, float] | None = None) -> dict[str, int]:
    """Channels each group keeps at pruning strength `knob` in [0, 1]; a group in `overrides`
    loses its own share whatever the knob (still above the floor, rounded the same way)."""
    kept = {}
    for name, ranking in rankings.items():
        size = len(ranking.order)
        least = max(1, math.ceil(floor * size))
        if name in (overrides or {}):
            count = max(least, size - round(overrides[name] * size))
        elif allocation == "uniform":
            count = max(least, size - round(knob * size))
        else:  # global: one threshold on the normalised score across groups
            count = max(least, sum(s >= knob for s in ranking.score))
        # Vector units and GEMM kernels run whole multiples of 8 (or 16) channels at full speed.
        kept[name] = min(size, -(-count // round_to) * round_to)
    return kept


def in_scope(structure: Structure, rankings: dict[str, Ranking],
             scope: Scope) -> dict[str, Ranking]:
    """The rankings of the groups in `scope` ("internal": single-producer groups only)."""
    rankings = {name: ranking for name, ranking in rankings.items()
                if scope == "all" or len(structure.group(name).producers) == 1}
    if not rankings:
        raise UserError(f"no channel group is in scope {scope!r} for this model; use "
                        "--scope all")
    return rankings


def removed_share(structure: Structure, rankings: dict[str, Ranking], target_kind: TargetKind,
                  allocation: Allocation, floor: float, round_to: int,
                  overrides: Mapping[str, float] | None = None,
                  costs: CostModel | None = None) -> Callable[[float], float]:
    """knob -> the share of the channels (or of the MACs, or of the latency `costs` predicts)
    that `kept_counts` removes."""
    total = sum(len(r.order) for r in rankings.values())
    if target_kind == "latency":
        before = costs.predict(structure, {})

    def share(knob: float) -> float:
        kept = kept_counts(rankings, knob, allocation, floor, round_to, overrides)
        if target_kind == "channels":
            return 1 - sum(kept.values()) / total
        if target_kind == "latency":
            return 1 - costs.predict(structure, kept) / before
        return 1 - structure.cost(kept)[0] / structure.macs
    return share


TARGET_UNITS = {"channels": "channels", "macs": "MACs", "latency": "latency"}  # a target's whole


def check_costs(target_kind: TargetKind, costs: CostModel | None) -> None:
    """A latency target needs a cost model: a one-line UserError without one."""
    if target_kind == "latency" and costs is None:
        raise UserError("a latency target needs the model's measured layer times: pass a cost "
                        "model, costs=prune.measured_costs(...) or text.latency."
                        "measured_text_costs(...) (the CLI and the pages measure them)")


SCAN = 100  # knobs tried, evenly, where the share removed does not grow with the knob


def _knobs(monotone: bool) -> list[float]:
    """The knobs a search tries before it bisects: the strongest alone where the share removed
    grows with the knob, else SCAN of them from the weakest up."""
    strongest = 1.0 + 1e-9
    return [strongest] if monotone else [k / SCAN for k in range(1, SCAN)] + [strongest]


def least_knob(removed: Callable[[float], float], target: float, *, what: str,
               monotone: bool = True) -> float:
    """The least pruning strength in [0, 1] whose plan removes at least `target`.

    Channels and MACs removed grow with the knob (uniform: fraction removed; global: score
    threshold). Predicted latency need not (`monotone=False`): a narrower layer can be timed
    slower than a wider one, so the first of SCAN knobs that reaches the target is found, then
    the boundary below it. A target met up to rounding counts as met: 1/6 of 72 heads is 12
    heads, though 1 − 60/72 falls a hair short of 1/6 in floating point.
    """
    if target == 0:
        return 0.0
    reach = target - 1e-12
    low = 0.0
    for high in _knobs(monotone):
        if removed(high) >= reach:
            break
        low = high
    else:
        raise UserError(f"target {target:g} cannot be reached: at most "
                        f"{most(removed, monotone=monotone):g} of the {what} can be removed with "
                        "these options; lower it")
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(middle) < reach else (low, middle)
    return high


def most(removed: Callable[[float], float], *, monotone: bool = True) -> float:
    """The largest share a plan can remove (floor and rounding keep the rest; the largest over
    the knobs tried where it is not `monotone`), rounded down to 0.001 so that it is itself
    reachable."""
    return math.floor(max(map(removed, _knobs(monotone))) * 1000) / 1000


def plan_pruning(structure: Structure, rankings: dict[str, Ranking], target: float, *,
                 method: str, target_kind: TargetKind = "channels",
                 allocation: Allocation = DEFAULT_ALLOCATION, scope: Scope = "all",
                 floor: float = FLOOR, round_to: int = ROUND_TO,
                 overrides: Mapping[str, float] | None = None,
                 costs: CostModel | None = None) -> PrunePlan:
    """The plan that removes at least `target` of the channels (or of the MACs, or of the
    measured latency).

    Args:
        structure: the model's channel groups and layer sizes (`trace_structure`).
        rankings: group name -> its channels in keep order (`importance.rank`).
        target: fraction in [0, 1) of prunable channels (target_kind="channels"), of the
            model's MACs ("macs") or of its latency on the device and batch size `costs` was
            measured on ("latency") to remove.
        method: the importance behind `rankings`, recorded in the plan.
        allocation: "uniform" (the same fraction of every group) or "global" (one threshold
            on the normalised score across groups).
        scope: "all" groups, or "internal": only groups with a single producer, i.e. not
            the residual streams that several layers add into (inside residual blocks).
        floor: fraction of each group that is always kept.
        round_to: kept channels per group are rounded up to a multiple of this (1 = exact
            counts); multiples of 8 run measurably faster on CPUs and GPUs, multiples of 16
            on CPUs with AVX-512 (docs/results.md, "speed").
        overrides: group name -> the share of that group to remove, whatever the target; the
            other groups are pruned as far as the target still needs (a target the overrides
            already meet leaves them whole).
        costs: the model's latency cost model (`latency.measured_costs`): needed for a latency
            target; with any target, the plan then carries its predicted latency.
    """
    check_target(target)
    check(Allocation, allocation)
    check(TargetKind, target_kind)
    check(Scope, scope)
    check_whole("--round-to", round_to, WHY_ROUND_TO)
    check_fraction("floor", floor, why=WHY_FLOOR)
    check_costs(target_kind, costs)
    rankings = in_scope(structure, rankings, scope)
    check_overrides(rankings, overrides)
    removed = removed_share(structure, rankings, target_kind, allocation, floor, round_to,
                            overrides, costs)
    knob = least_knob(removed, target, what=TARGET_UNITS[target_kind],
                      monotone=target_kind != "latency")
    kept = kept_counts(rankings, knob, allocation, floor, round_to, overrides)
    if target_kind == "latency":
        kept = give_back(rankings, kept, lambda more: costs.predict(structure, more),
                         budget=(1 - target) * costs.predict(structure, {}), round_to=round_to,
                         fixed=overrides or {})
    groups = tuple(GroupPlan(g.name, g.size,
                             tuple(sorted(rankings[g.name].order[:kept[g.name]])),
                             tuple(sorted(rankings[g.name].order[kept[g.name]:])))
                   for g in structure.groups if g.name in rankings)
    macs, params = structure.cost(kept)
    latency = (costs.predict(structure, {}), costs.predict(structure, kept)) if costs else ()
    return PrunePlan(method, target, target_kind, allocation, scope, groups,
                     structure.macs, macs, structure.params, params, *latency)


def give_back(rankings: dict[str, Ranking], kept: dict[str, int],
              cost: Callable[[dict[str, int]], float], *, budget: float, round_to: int,
              fixed: Mapping[str, float],
              priority: Callable[[str, int, float], object] | None = None) -> dict[str, int]:
    """`kept` with blocks of `round_to` channels given back while `cost` stays within `budget`:
    the cheapest block first (ties: the best-scored), until none fits. `priority(group, kept
    count, extra cost)` orders the blocks otherwise (the smallest first).

    Under a latency cost model some blocks are free: vector units run whole blocks of 16
    channels on AVX-512, so a layer 24 channels wide takes as long as one 32 wide (seen where
    every multiple of 8 is timed, layers up to 64 channels; docs/results.md, "A latency
    target"). Groups in `fixed` (overrides) keep their share.
    """
    kept = dict(kept)
    while True:
        now, best = cost(kept), None
        for name, count in kept.items():
            size = len(rankings[name].order)
            if name in fixed or count >= size:
                continue
            more = {**kept, name: min(size, count + round_to)}
            spent = cost(more)
            if spent <= budget + 1e-12:
                key = ((spent - now, -rankings[name].score[count]) if priority is None
                       else priority(name, count, spent - now))
                if best is None or key < best[0]:
                    best = (key, more)
        if best is None:
            return kept
        kept = best[1]


def check_overrides(rankings: dict[str, Ranking], overrides: Mapping[str, float] | None) -> None:
    """Every override names a group in scope and a share in [0, 1] (the floor is kept)."""
    for name, share in (overrides or {}).items():
        if name not in rankings:
            raise UserError(f"override {name!r} is not a channel group in scope; use one of "
                            f"{', '.join(rankings)}")
        check_fraction(f"override of {name}", share, why=WHY_OVERRIDE)
