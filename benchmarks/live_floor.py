"""How far the Prune slider's library path is from the machine's arithmetic limit.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/live_floor.py [--model fmnist-resnet]

For a few MACs targets: the median seconds (of 5) of each stage of one slider move (plan; refit
and surgery; BatchNorm recalibration on the 1,000 live calibration images; evaluation on the
2,000 live test images), the multiply-accumulates per second the two passes over images reach,
and the floor: the seconds those passes would take at the rate of one large float32 matrix
product (2048², the best this CPU does). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch
from _table import markdown

from modhifi import bench, zoo
from modhifi.backend import choose_backend
from modhifi.metrics import count_cost, evaluate
from modhifi.prune import recalibrate_batchnorm


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """Multiply-accumulates per second of a float32 (size, size) matrix product."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * size**3 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    args = parser.parse_args()
    backend = choose_backend("cpu")
    subject = zoo.open_subject(args.model, device=backend.device)
    dataset = subject.dataset
    analysis = bench.live_analysis(subject.loaded.model, dataset, backend=backend)
    live = dataset.test.subset(slice(0, bench.LIVE_TEST_IMAGES))
    peak = matmul_rate()
    rows = []
    for target in args.targets:
        stages = {"plan": [], "refit_cut": [], "recalibrate": [], "evaluate": []}
        for _ in range(5):
            times = [time.perf_counter()]
            plan = analysis.plan(target, target_kind="macs")
            times.append(time.perf_counter())
            model = analysis.apply(plan, recalibrate=False)
            times.append(time.perf_counter())
            recalibrate_batchnorm(model, analysis.calibration)
            times.append(time.perf_counter())
            evaluate(model, live, device=backend.device, num_classes=dataset.num_classes)
            times.append(time.perf_counter())
            for stage, before, after in zip(stages, times, times[1:]):
                stages[stage].append(after - before)
        seconds = {stage: statistics.median(values) for stage, values in stages.items()}
        macs = count_cost(model, dataset.input_shape).macs  # per image
        calibration = bench.LIVE_CALIBRATION_IMAGES
        rows.append({"target": target, **{f"{k}_s": v for k, v in seconds.items()},
                     "total_s": sum(seconds.values()), "mmacs_per_image": macs / 1e6,
                     "recalibrate_gmacs": calibration * macs / seconds["recalibrate"] / 1e9,
                     "evaluate_gmacs": len(live) * macs / seconds["evaluate"] / 1e9,
                     "floor_s": (calibration + len(live)) * macs / peak})
    print(markdown(pd.DataFrame(rows)))
    print(f"float32 2048² matrix product: {peak / 1e9:.0f} GMAC/s; "
          f"threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
