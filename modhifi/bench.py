"""Short benchmarks behind `python -m modhifi bench --quick`: quality against the baselines at
half the MACs, the measured speed-up, and the latency of the dashboard's slider path; and the
sweep (plan, apply, evaluate for a list of requests) that they and the dashboard's accuracy
against sparsity curve share.

The full benchmark scripts live in benchmarks/; this module holds what the CLI needs.
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from modhifi.backend import Backend, percentile
from modhifi.data import Dataset, Split
from modhifi.metrics import evaluate, measure_latencies
from modhifi.options import DEFAULT_METHOD
from modhifi.prune import Analysis, CostModel, PrunePlan, analyse
from modhifi.requests import PruneRequest

LIVE_TEST_IMAGES = 2000  # the dashboard's live numbers use this prefix of the test split
LIVE_CALIBRATION_IMAGES = 1000  # the dashboard's default calibration set


def live_analysis(model, dataset: Dataset, *, backend: Backend,
                  samples: int = LIVE_CALIBRATION_IMAGES,
                  progress: Callable[[float], None] | None = None) -> Analysis:
    """The analysis the dashboard caches: the first `samples` calibration images (by default
    `LIVE_CALIBRATION_IMAGES`) in batches of 250; `progress` as in `prune.analyse`."""
    live = dataset.calibration.subset(slice(0, samples)).batches(250)
    return analyse(model, live, device=backend.device, input_shape=dataset.input_shape,
                   progress=progress)


@dataclass(frozen=True)
class SweepPoint:
    """One request of a sweep: its plan, the pruned model, its accuracy and the seconds taken."""

    request: PruneRequest
    plan: PrunePlan
    model: nn.Module = field(repr=False)
    accuracy: float
    seconds: float  # plan, apply and evaluate

    def to_row(self) -> dict:
        """The plain numbers, for a table."""
        return {"method": self.request.method, "compensation": self.request.compensation,
                "target": self.request.target, "target_kind": self.request.target_kind,
                "macs_reduction": self.plan.speedup_macs, "accuracy": self.accuracy,
                "seconds": self.seconds}


def sweep(analysis: Analysis, requests: Sequence[PruneRequest], split: Split, *,
          backend: Backend, num_classes: int, costs: CostModel | None = None,
          progress: Callable[[float], None] | None = None) -> Iterator[SweepPoint]:
    """Plan, apply and evaluate on `split` each request in turn, one pruned model at a time.

    Args:
        analysis: the model's analysis (statistics and rankings are reused across requests).
        requests: the prunings, in order.
        split: the images every pruned model is evaluated on.
        costs: the model's latency cost model, for latency targets (`prune.measured_costs`).
        progress: called with the share of requests done (for progress bars).

    Returns:
        An iterator of `SweepPoint`s, one per request, each computed when it is asked for.
    """
    for done, request in enumerate(requests, 1):
        start = time.perf_counter()
        plan = analysis.plan(**request.plan_kwargs(), costs=costs)
        model = analysis.apply(plan, **request.apply_kwargs())
        accuracy = evaluate(model, split, device=backend.device, num_classes=num_classes).accuracy
        yield SweepPoint(request, plan, model, accuracy, time.perf_counter() - start)
        if progress:
            progress(done / len(requests))


@dataclass(frozen=True)
class SliderLatency:
    """Seconds from a new slider position to updated numbers (plan, apply, live evaluation)."""

    median_s: float
    p95_s: float
    positions: int


def slider_latency(analysis: Analysis, dataset: Dataset, *, backend: Backend, positions: int = 20,
                   seed: int = 0) -> SliderLatency:
    """Time the library path behind the Prune page over random MACs targets (statistics cached)."""
    generator = random.Random(seed)
    live = dataset.test.subset(slice(0, LIVE_TEST_IMAGES))
    requests = [PruneRequest(target=round(generator.uniform(0.1, 0.75), 2), target_kind="macs")
                for _ in range(positions)]  # ModHiFi, refit: the Prune page's defaults
    seconds = [point.seconds for point in sweep(analysis, requests, live, backend=backend,
                                                num_classes=dataset.num_classes)]
    return SliderLatency(statistics.median(seconds), percentile(seconds, 0.95), positions)


def quick(model, dataset: Dataset, *, backend: Backend, calibration_samples: int = 2000,
          target: float = 0.5, batch_size: int = 64, positions: int = 20) -> dict:
    """ModHiFi against the best BN-recalibrated baseline at `target` of the MACs removed."""
    calibration = dataset.calibration.subset(slice(0, calibration_samples)).batches(500)
    analysis = analyse(model, calibration, device=backend.device, input_shape=dataset.input_shape)

    # compensation by default: refit for ModHiFi, none for the baselines
    requests = [PruneRequest(target=target, target_kind="macs", method=method)
                for method in (DEFAULT_METHOD, "l1", "random", "activation")]
    points = sweep(analysis, requests, dataset.test, backend=backend,
                   num_classes=dataset.num_classes)
    ours = next(points)  # kept for timing; each baseline's model is dropped once evaluated
    baselines = {point.request.method: point.accuracy for point in points}
    dense, small = measure_latencies([model, ours.model], dataset.input_shape, backend=backend,
                                     batch_size=batch_size)
    slider = slider_latency(live_analysis(model, dataset, backend=backend), dataset,
                            backend=backend, positions=positions)
    best = max(baselines, key=baselines.get)
    return {"accuracy_modhifi": ours.accuracy, "accuracy_best_baseline": baselines[best],
            "best_baseline": best, "macs_ratio": ours.plan.speedup_macs,
            "speedup_measured": dense.optimised.median_ms / small.optimised.median_ms,
            "speedup_eager": dense.eager.median_ms / small.eager.median_ms,
            "slider_median_s": slider.median_s, "slider_p95_s": slider.p95_s,
            "batch_size": batch_size, "device": backend.description}
