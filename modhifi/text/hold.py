"""A latency target on a text encoder that holds: the image loop (`prune.hold.hold`) with the
encoder's cut (`text.surgery.apply_plan`) and its throughput on the timing texts.

The text cost model times one FFN and one attention block alone (`text.latency`); inside the
encoder, attention heads ran about 10% slower than predicted (docs/results.md, "A latency
target"), so only a measurement after the cut says whether the target is met.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from modhifi.backend import Backend
from modhifi.options import Component, TextCompensation
from modhifi.prune.hold import TRIES, HeldTarget, check_batch, hold
from modhifi.text.components import TextAnalysis, TextPlan
from modhifi.text.latency import BATCHES, TextCosts
from modhifi.text.quality import sentences_per_second
from modhifi.text.surgery import apply_plan


def hold_text_latency(analysis: TextAnalysis, target: float, *, kind: Component,
                      costs: TextCosts, texts: Sequence[str], backend: Backend, batch_size: int,
                      compensation: TextCompensation = "refit", tries: int = TRIES,
                      **options) -> HeldTarget[TextPlan]:
    """Prune `analysis`' encoder to remove `target` of its measured latency: plan, cut, time the
    encoders side by side on the first `BATCHES × batch_size` of `texts` (those `costs` was
    measured on), and where it falls short plan for the last prediction plus the shortfall
    (`prune.hold.hold`). The CLI's `speedup_measured` is timed on the test texts afterwards.

    Args:
        kind: "ffn" or "heads".
        costs: the encoder's cost model, measured on `backend` at `batch_size`.
        options: the other arguments of `TextAnalysis.plan` (method, round_to, …).
    """
    check_batch(costs, batch_size, backend)

    def cut(asked: float) -> tuple[TextPlan, nn.Module, float, float]:
        plan = analysis.plan(asked, kind=kind, target_kind="latency", costs=costs, **options)
        model = apply_plan(analysis, plan, compensation=compensation)
        before, after = sentences_per_second([analysis.model, model], texts, backend=backend,
                                             batch_size=batch_size, batches=BATCHES)
        return (plan, model, 1 - plan.latency_after_ms / plan.latency_before_ms,
                1 - before / after)

    reach = analysis.most(kind=kind, target_kind="latency", costs=costs, **options)
    return hold(target, reach, cut, tries=tries)
