"""Short benchmarks behind `python -m modhifi bench --quick`: quality against the baselines at
half the MACs, the measured speed-up, and the latency of the dashboard's slider path.

The full benchmark scripts live in benchmarks/; this module holds what the CLI needs.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from modhifi.backend import Backend, percentile
from modhifi.data import Dataset
from modhifi.metrics import evaluate, measure_latencies
from modhifi.prune import Analysis, analyse

LIVE_TEST_IMAGES = 2000  # the dashboard's live numbers use this prefix of the test split
LIVE_CALIBRATION_IMAGES = 1000  # the dashboard's default calibration set


def live_analysis(model, dataset: Dataset, *, backend: Backend) -> Analysis:
    """The analysis the dashboard caches by default: the first `LIVE_CALIBRATION_IMAGES`
    calibration images in batches of 250."""
    live = dataset.calibration.subset(slice(0, LIVE_CALIBRATION_IMAGES)).batches(250)
    return analyse(model, live, device=backend.device, input_shape=dataset.input_shape)


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
    seconds = []
    for _ in range(positions):
        target = round(generator.uniform(0.1, 0.75), 2)
        start = time.perf_counter()
        plan = analysis.plan(target, target_kind="macs")
        model = analysis.apply(plan, compensation="refit")
        evaluate(model, live, device=backend.device, num_classes=dataset.num_classes)
        seconds.append(time.perf_counter() - start)
    return SliderLatency(statistics.median(seconds), percentile(seconds, 0.95), positions)


def quick(model, dataset: Dataset, *, backend: Backend, calibration_samples: int = 2000,
          target: float = 0.5, batch_size: int = 64, positions: int = 20) -> dict:
    """ModHiFi against the best BN-recalibrated baseline at `target` of the MACs removed."""
    calibration = dataset.calibration.subset(slice(0, calibration_samples)).batches(500)
    analysis = analyse(model, calibration, device=backend.device, input_shape=dataset.input_shape)

    def accuracy(method: str, compensation: str) -> tuple[float, object]:
        plan = analysis.plan(target, target_kind="macs", method=method)
        pruned = analysis.apply(plan, compensation=compensation)
        return evaluate(pruned, dataset.test, device=backend.device,
                        num_classes=dataset.num_classes).accuracy, (plan, pruned)

    ours, (plan, pruned) = accuracy("modhifi", "refit")
    baselines = {m: accuracy(m, "none")[0] for m in ("l1", "random", "activation")}
    dense, small = measure_latencies([model, pruned], dataset.input_shape, backend=backend,
                                     batch_size=batch_size)
    slider = slider_latency(live_analysis(model, dataset, backend=backend), dataset,
                            backend=backend, positions=positions)
    best = max(baselines, key=baselines.get)
    return {"accuracy_modhifi": ours, "accuracy_best_baseline": baselines[best],
            "best_baseline": best, "macs_ratio": plan.speedup_macs,
            "speedup_measured": dense.optimised.median_ms / small.optimised.median_ms,
            "speedup_eager": dense.eager.median_ms / small.eager.median_ms,
            "slider_median_s": slider.median_s, "slider_p95_s": slider.p95_s,
            "batch_size": batch_size, "device": backend.description}
