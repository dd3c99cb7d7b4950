"""A latency target that holds: plan with the cost model, cut, time the pruned model beside the
dense one, and where the measured share of latency removed falls short of the target, plan again
for the shortfall.

The cost model predicts each plan's latency from layers timed alone (`prune.latency`); inside the
whole optimised pass they run a few percent faster or slower (docs/results.md, "A latency
target"), so only a measurement after the cut says whether the target is met.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from modhifi.backend import Backend
from modhifi.errors import UserError
from modhifi.metrics import Latency, measure_latencies
from modhifi.options import Compensation
from modhifi.prune.analysis import Analysis
from modhifi.prune.latency import CostModel
from modhifi.prune.plan import PrunePlan

TRIES = 3          # plans cut and timed at most
TOLERANCE = 0.005  # a measured share this far below the target counts as met (timing noise)


@dataclass(frozen=True)
class HeldTarget:
    """The plan whose cut model met the latency target (or the last one tried), as measured."""

    plan: PrunePlan
    model: nn.Module = field(repr=False)
    dense: Latency
    pruned: Latency
    asked: tuple[float, ...]  # the target each try planned for, the first the user's

    @property
    def removed(self) -> float:
        """The share of the optimised latency the cut removed, measured."""
        return 1 - self.pruned.optimised.median_ms / self.dense.optimised.median_ms


def hold_latency(analysis: Analysis, target: float, *, costs: CostModel, backend: Backend,
                 batch_size: int, compensation: Compensation = "refit", recalibrate: bool = True,
                 tries: int = TRIES, **options) -> HeldTarget:
    """Prune `analysis`' model to remove `target` of its measured latency: plan, cut, time; plan
    for more where the measurement falls short (by the shortfall, at most `tries` cuts).

    Args:
        analysis: the model's analysis.
        target: the share of latency to remove, in [0, 1).
        costs: the model's cost model, measured on `backend` at `batch_size`.
        compensation, recalibrate: as in `Analysis.apply`.
        options: the other arguments of `Analysis.plan` (method, allocation, scope, …).

    Returns:
        The first try whose measured share is within `TOLERANCE` of the target, else the one
        that came closest. With several processes, process 0 times and the others follow it.
    """
    if costs.batch_size != batch_size or costs.device != backend.description:
        raise UserError(f"the cost model was measured at batch {costs.batch_size} on "
                        f"{costs.device}, not at batch {batch_size} on {backend.description}: "
                        "measure it for this batch size and device")
    if tries < 1:
        raise UserError(f"tries {tries!r} must be at least 1 (cuts timed)")
    reach = analysis.most(target_kind="latency", costs=costs, **options)
    asked, best = [target], None
    while True:
        plan = analysis.plan(asked[-1], target_kind="latency", costs=costs, **options)
        model = analysis.apply(plan, compensation=compensation, recalibrate=recalibrate)
        timed = analysis.shard.on_main(lambda: measure_latencies(
            [analysis.model, model], analysis.input_shape, backend=backend, batch_size=batch_size))
        held = HeldTarget(plan, model, *timed, tuple(asked))
        best = held if best is None or held.removed > best.removed else best
        short = target - held.removed
        if short <= TOLERANCE or len(asked) == tries or asked[-1] >= reach:
            return best if short > TOLERANCE else held
        asked.append(min(reach, asked[-1] + short))
