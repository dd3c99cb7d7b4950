"""The iterative mode: several rounds of score → plan → apply, each on the model the previous
round left."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from modhifi.options import (DEFAULT_ALLOCATION, DEFAULT_METHOD, ROUND_TO, WHY_STEPS, Allocation,
                             Compensation, Method, Scope, TargetKind, check_target, check_whole)
from modhifi.data import reusable
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.prune.analysis import analyse
from modhifi.prune.latency import CostModel
from modhifi.prune.plan import PrunePlan, check_costs
from modhifi.prune.structure import Structure


def _size(plan: PrunePlan, target_kind: TargetKind) -> float:
    """What a target counts, before the plan: channels in scope, MACs or predicted latency."""
    return {"channels": plan.channels_before, "macs": plan.macs_before,
            "latency": plan.latency_before_ms}[target_kind]


def prune_in_steps(model: nn.Module, calibration: Iterable[torch.Tensor], *, device: torch.device,
                   input_shape: tuple[int, ...], target: float, steps: int,
                   target_kind: TargetKind = "channels",
                   allocation: Allocation = DEFAULT_ALLOCATION, method: Method = DEFAULT_METHOD,
                   scope: Scope = "all", compensation: Compensation = "refit",
                   recalibrate: bool = True,
                   round_to: int = ROUND_TO, costs: CostModel | None = None,
                   shard: Shard = ALONE, progress: Callable[[float], None] | None = None,
                   structure: Structure | None = None,
                   ) -> tuple[nn.Module, tuple[PrunePlan, ...]]:
    """The iterative mode: `steps` rounds of score → remove → compensate → recalibrate.

    Each round removes an equal share of the original channels (or MACs), re-scoring the model
    that the previous round left (a latency target: as the model's `costs`, measured once,
    predict it). Returns the pruned model and each round's plan. With several
    processes (`shard`), `calibration` is this one's batches (`modhifi.distributed`).
    `progress` is told the share of the calibration batches each round's statistics have read.
    `structure`: `model`'s, where the caller has traced it (the first round's; the others trace
    the model the round before left).
    """
    check_whole("--steps", steps, WHY_STEPS)
    check_target(target)
    check_costs(target_kind, costs)
    batches = reusable(calibration, device)
    current, plans = model, []
    for step in range(1, steps + 1):
        analysis = analyse(current, batches, device=device, input_shape=input_shape, shard=shard,
                           progress=progress, structure=None if plans else structure)
        options = {"target_kind": target_kind, "allocation": allocation, "method": method,
                   "scope": scope, "round_to": round_to, "costs": costs}
        now = analysis.plan(0.0, **options)  # as it is (the ranking the round needs anyway)
        done = 1 - _size(now, target_kind) / _size(plans[0], target_kind) if plans else 0.0
        goal = target * step / steps  # share of the original model removed after this round
        share = max(0.0, 1 - (1 - goal) / (1 - done))  # of what this round starts from
        try:
            plan = analysis.plan(share, **options)
        except UserError:
            if not plans:  # the first round's message is about the user's own target
                raise
            raise UserError(f"target {target:g} cannot be reached in {steps} rounds: after "
                            f"round {step - 1} ({done:.3f} removed), round {step} can remove at "
                            f"most {analysis.most(**options):g} of what is left, where "
                            f"{share:.3f} is needed; lower the target or prune in fewer "
                            "rounds") from None
        shard.check_same(plan.removed_channels(), "plans")  # else their models would differ
        current = analysis.apply(plan, compensation=compensation, recalibrate=recalibrate)
        plans.append(plan)
    return current, tuple(plans)

