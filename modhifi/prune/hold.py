"""A latency target that holds: plan with the cost model, cut, time the pruned model beside the
dense one, and where the measured share of latency removed falls short of the target, plan again
for the last prediction plus the shortfall.

The cost model predicts each plan's latency from layers timed alone (`prune.latency`); inside the
whole optimised pass they run a few percent faster or slower (docs/results.md, "A latency
target"), so only a measurement after the cut says whether the target is met.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from torch import nn

from modhifi.backend import Backend
from modhifi.errors import UserError
from modhifi.metrics import measure_latencies
from modhifi.options import Compensation
from modhifi.prune.analysis import Analysis
from modhifi.prune.latency import CostModel
from modhifi.prune.plan import PrunePlan

TRIES = 3          # plans cut and timed at most
TOLERANCE = 0.005  # a measured share this far below the target counts as met (timing noise)

Plan = TypeVar("Plan")


def meets(target: float, removed: float) -> bool:
    """Whether a measured share of latency `removed` meets `target` (within `TOLERANCE`)."""
    return target - removed <= TOLERANCE


@dataclass(frozen=True)
class HeldTarget(Generic[Plan]):
    """The plan whose cut model met the latency target (or the one that came closest)."""

    plan: Plan
    model: nn.Module = field(repr=False)
    planned: float            # the share of latency the plan was predicted to remove
    removed: float            # the share the cut removed, measured
    asked: tuple[float, ...]  # the target of every try, the first the user's


def hold(target: float, reach: float,
         cut: Callable[[float], tuple[Plan, nn.Module, float, float]], *,
         tries: int = TRIES) -> HeldTarget[Plan]:
    """Plan, cut and time: `cut(asked)` gives the plan, its model, the share of latency the plan
    predicts it removes and the share measured. Where the measurement falls short of `target`,
    plan for the prediction plus the shortfall (a plan that already predicted more than it was
    asked is not asked for the same again), up to `reach` (the most a plan can predict), at most
    `tries` cuts.

    Returns:
        The first try whose measured share is within `TOLERANCE` of the target, else the one
        that came closest; `asked` lists every try's target either way.
    """
    if tries < 1:
        raise UserError(f"tries {tries!r} must be at least 1 (cuts timed)")
    asked, best = [target], None
    while True:
        held = HeldTarget(*cut(asked[-1]), tuple(asked))
        best = held if best is None or held.removed > best.removed else best
        if meets(target, held.removed):
            return held
        # No more to ask for once a plan predicts all that can go: it would be cut again.
        if len(asked) == tries or max(asked[-1], held.planned) >= reach:
            return replace(best, asked=tuple(asked))
        asked.append(min(reach, held.planned + target - held.removed))


def check_batch(costs, batch_size: int, backend: Backend) -> None:
    """A cost model (image or text) measured at another batch size or device is refused."""
    if costs.batch_size != batch_size or costs.device != backend.description:
        raise UserError(f"the cost model was measured at batch {costs.batch_size} on "
                        f"{costs.device}, not at batch {batch_size} on {backend.description}: "
                        "measure it for this batch size and device")


def hold_latency(analysis: Analysis, target: float, *, costs: CostModel, backend: Backend,
                 batch_size: int, compensation: Compensation = "refit", recalibrate: bool = True,
                 tries: int = TRIES, **options) -> HeldTarget[PrunePlan]:
    """Prune `analysis`' model to remove `target` of its measured latency (`hold`): the pruned
    model's optimised pass timed beside the dense one's.

    Args:
        analysis: the model's analysis.
        target: the share of latency to remove, in [0, 1).
        costs: the model's cost model, measured on `backend` at `batch_size`.
        compensation, recalibrate: as in `Analysis.apply`.
        options: the other arguments of `Analysis.plan` (method, allocation, scope, …).

    Returns:
        As `hold`. With several processes, process 0 times and the others follow it.
    """
    check_batch(costs, batch_size, backend)

    def cut(asked: float) -> tuple[PrunePlan, nn.Module, float, float]:
        plan = analysis.plan(asked, target_kind="latency", costs=costs, **options)
        model = analysis.apply(plan, compensation=compensation, recalibrate=recalibrate)
        dense, pruned = analysis.shard.on_main(lambda: measure_latencies(
            [analysis.model, model], analysis.input_shape, backend=backend, batch_size=batch_size))
        return (plan, model, 1 - plan.latency_after_ms / plan.latency_before_ms,
                1 - pruned.optimised.median_ms / dense.optimised.median_ms)

    reach = analysis.most(target_kind="latency", costs=costs, **options)
    return hold(target, reach, cut, tries=tries)
