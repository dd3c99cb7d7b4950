"""Does a latency target hold? Planned against measured speed-up, and against a MACs target.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/latency_target.py [--models ...] [--batches 1 64]

For each zoo model and batch size: the latency cost model is measured (each Conv2d/Linear timed
alone at candidate widths, `prune.latency`; the seconds it took are reported), then for each
target T the default plan (greedy ranking, uniform, multiples of 8, refit, BatchNorm
recalibrated) removes T of the predicted latency (a T out of reach is skipped, with a line);
the held one (`prune.hold`) cuts, times, and plans for the last prediction plus the shortfall
until the measured share reaches T (at most 3 cuts); the MACs plan removes T of the MACs. The
dense model and the three pruned ones are timed side by side in one run (inference-optimised:
BatchNorm folded, frozen TorchScript, channels-last; median of 30 after 5 warm-up), and
evaluated on the whole test split. 2,000 calibration images. Writes
docs/benchmarks/latency_target.csv.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from _table import markdown

from modhifi.backend import choose_backend
from modhifi.metrics import evaluate, measure_latencies
from modhifi.prune import analyse
from modhifi.prune.hold import hold_latency
from modhifi.prune.latency import measure_costs
from modhifi.zoo import open_subject

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"fmnist-resnet": (0.3, 0.5, 0.65), "fmnist-vgg": (0.3, 0.5, 0.65),
           "fmnist-vit": (0.15, 0.3)}  # only the ViT's FFN neurons go: ≤ 46% of its MACs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TARGETS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    backend = choose_backend(args.device)
    rows = []
    for name in args.models:
        subject = open_subject(name, device=backend.device)
        data = subject.dataset
        calibration = data.calibration.subset(slice(0, 2000)).batches(500)
        analysis = analyse(subject.loaded.model, calibration, device=backend.device,
                           input_shape=data.input_shape)

        def accuracy(model) -> float:
            return evaluate(model, data.test, device=backend.device,
                            num_classes=data.num_classes).accuracy

        dense_accuracy = accuracy(analysis.model)
        for batch in args.batches:
            costs = measure_costs(analysis.model, analysis.structure, data.input_shape,
                                  backend=backend, batch_size=batch)
            reach = analysis.most(target_kind="latency", costs=costs)
            for target in TARGETS[name]:
                if target > reach:
                    print(f"{name}, batch {batch}: {target} of the latency is out of reach "
                          f"(at most {reach})", flush=True)
                    continue
                by_latency = analysis.plan(target, target_kind="latency", costs=costs)
                by_macs = analysis.plan(target, target_kind="macs", costs=costs)
                held = hold_latency(analysis, target, costs=costs, backend=backend,
                                    batch_size=batch)
                models = [analysis.apply(by_latency), held.model, analysis.apply(by_macs)]
                dense, *timed = measure_latencies([analysis.model, *models], data.input_shape,
                                                  backend=backend, batch_size=batch)
                for kind, plan, model, timing in zip(
                        ("latency", f"latency held ({len(held.asked)} cuts)", "macs"),
                        (by_latency, held.plan, by_macs), models, timed):
                    measured = dense.optimised.median_ms / timing.optimised.median_ms
                    rows.append({
                        "model": name, "batch": batch, "target": target, "target_kind": kind,
                        "macs_x": plan.speedup_macs, "planned_x": plan.speedup_planned,
                        "measured_x": measured,
                        "planned_error": measured / plan.speedup_planned - 1,
                        "latency_removed": 1 - 1 / measured,
                        "accuracy_drop": (accuracy(model) - dense_accuracy) * 100,
                        "cost_model_s": costs.seconds, "dense_ms": dense.optimised.median_ms,
                        "device": backend.description})
                    print(markdown(pd.DataFrame(rows[-1:])), flush=True)
    frame = pd.DataFrame(rows)
    out = ROOT / "docs" / "benchmarks" / "latency_target.csv"
    frame.to_csv(out, index=False)
    print(markdown(frame))


if __name__ == "__main__":
    main()
