"""Does ModHiFi-U forget every class of a zoo model while keeping the others?

Runs `modhifi.unlearn.unlearn` once per class with the library's defaults (k chosen per class from
the forget-class calibration samples; the test split only audits) and writes one CSV row per class
to docs/benchmarks/unlearn_<model>.csv, then prints a summary line.

    .venv/bin/python benchmarks/unlearn_classes.py --model fmnist-resnet
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from modhifi.backend import choose_backend
from modhifi.errors import UserError
from modhifi.unlearn import model_outputs, unlearn
from modhifi.zoo import open_subject

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("forget_class", "class_name", "edit", "layers", "k", "calibration_forget_accuracy",
           "forget_accuracy_before", "forget_accuracy_after", "retain_accuracy_before",
           "retain_accuracy_after", "retain_drop", "test_accuracy_before", "test_accuracy_after",
           "mia_before", "mia_after", "probe_accuracy_before", "probe_accuracy_after", "seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--edit", choices=("zero", "negate"), help="default: by architecture")
    parser.add_argument("--layers", type=int, help="default: the library's (2)")
    parser.add_argument("--k", type=float, help="fixed share of pairs (default: chosen per class)")
    parser.add_argument("--target", type=float, default=0.0,
                        help="forget accuracy on the calibration samples that k must reach")
    parser.add_argument("--classes", help="comma-separated class indices (default: all)")
    parser.add_argument("--out", type=Path,
                        help="CSV path (default: docs/benchmarks/unlearn_<model>.csv)")
    args = parser.parse_args(argv)

    try:
        backend = choose_backend(args.device)
        subject = open_subject(args.model, device=backend.device)
        model, dataset = subject.loaded.model, subject.dataset
        classes = ([int(c) for c in args.classes.split(",")] if args.classes
                   else range(dataset.num_classes))
        print(f"{args.model} on {backend.description} (torch threads: {torch.get_num_threads()})",
              file=sys.stderr)
        # The original model's test logits and probe do not depend on the forget class.
        before = model_outputs(model, dataset, device=backend.device)
        rows = []
        for forget_class in classes:
            result = unlearn(model, dataset, forget_class=forget_class, device=backend.device,
                             edit=args.edit, layers=args.layers, k=args.k,
                             target_forget_accuracy=args.target, before=before)
            row = result.summary(model=args.model, device=backend.description)
            row.update(class_name=dataset.classes[forget_class],
                       calibration_forget_accuracy=result.plan.calibration_forget_accuracy,
                       retain_drop=row["retain_accuracy_before"] - row["retain_accuracy_after"],
                       test_accuracy_before=result.before.test_accuracy,
                       test_accuracy_after=result.after.test_accuracy)
            rows.append({key: row[key] for key in COLUMNS})
            print("  ".join(f"{key}={_fmt(rows[-1][key])}" for key in COLUMNS), flush=True)
    except UserError as error:
        print(f"unlearn_classes: error: {error}", file=sys.stderr)
        return 2

    out = args.out or ROOT / "docs" / "benchmarks" / f"unlearn_{args.model}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: _fmt(value) for key, value in row.items()} for row in rows)
    drops = [row["retain_drop"] for row in rows]
    print(f"summary {args.model} ({backend.description}): "
          f"max forget accuracy {max(r['forget_accuracy_after'] for r in rows):.4f}, "
          f"retain drop mean {sum(drops) / len(drops) * 100:.2f} points, "
          f"max {max(drops) * 100:.2f} points, "
          f"max seconds {max(r['seconds'] for r in rows):.2f} -> {out}")
    return 0


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else value


if __name__ == "__main__":
    sys.exit(main())
