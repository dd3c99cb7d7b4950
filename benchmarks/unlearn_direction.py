"""ModHiFi-U's class-direction edit (`modhifi.unlearn.direction`) on every class of a zoo model.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/unlearn_direction.py [--model fmnist-vit]

Per forget class: the strength chosen on calibration images and the calibration forget accuracy
there; on the whole test split, the forget class's accuracy before and after and the other
classes' accuracy change (retain drop, points); the seconds of statistics, strength search and
edit. Writes docs/benchmarks/unlearn_direction_MODEL.csv and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from _table import markdown

from modhifi import zoo
from modhifi.backend import choose_backend
from modhifi.metrics import evaluate
from modhifi.unlearn import apply_direction, class_direction, plan_direction

ROOT = Path(__file__).resolve().parent.parent


def forget_and_retain(confusion: tuple[tuple[int, ...], ...], forget: int
                      ) -> tuple[float, float]:
    """Accuracy on the forget class's test images, and on all the others."""
    confusion = torch.tensor(confusion, dtype=torch.float64)  # rows: true class
    others = torch.ones(len(confusion), dtype=torch.bool)
    others[forget] = False
    correct = confusion.diagonal().double()
    rows = confusion.sum(1).double()
    return float(correct[forget] / rows[forget]), float(correct[others].sum() / rows[others].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-vit")
    args = parser.parse_args()
    backend = choose_backend("cpu")
    subject = zoo.open_subject(args.model, device=backend.device)
    model, dataset = subject.loaded.model.eval(), subject.dataset
    dense = evaluate(model, dataset.test, device=backend.device,
                     num_classes=dataset.num_classes).confusion
    rows = []
    for forget in range(dataset.num_classes):
        start = time.perf_counter()
        direction = class_direction(model, dataset.calibration, forget_class=forget,
                                    device=backend.device)
        plan = plan_direction(model, direction, dataset.calibration, device=backend.device)
        edited = apply_direction(model, plan)
        seconds = time.perf_counter() - start
        after = evaluate(edited, dataset.test, device=backend.device,
                         num_classes=dataset.num_classes).confusion
        forget_before, retain_before = forget_and_retain(dense, forget)
        forget_after, retain_after = forget_and_retain(after, forget)
        rows.append({"class": dataset.classes[forget], "strength": plan.strength,
                     "calibration_forget": plan.calibration_forget_accuracy,
                     "forget_before": forget_before, "forget_after": forget_after,
                     "retain_drop_points": 100 * (retain_before - retain_after),
                     "seconds": seconds})
    frame = pd.DataFrame(rows)
    out = ROOT / "docs" / "benchmarks" / f"unlearn_direction_{args.model}.csv"
    frame.to_csv(out, index=False, float_format="%.4f")
    print(markdown(frame))
    print(f"classes at ≤ 1%: {int((frame.forget_after <= 0.01).sum())} of {len(frame)}; mean "
          f"retain drop {frame.retain_drop_points.mean():.2f} points; threads: "
          f"{torch.get_num_threads()}; {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
