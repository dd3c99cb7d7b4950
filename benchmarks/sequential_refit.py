"""The sequential refit against the one-shot refit, at issue 16's two sizes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sequential_refit.py [--model fmnist-resnet]

The CLI's calibration (the first 2,000 calibration images in batches of 128) and default plan
(greedy ranking, uniform, multiples of 8) at half and two-thirds of the MACs. For each
compensation (`Analysis.apply`): the accuracy on the whole test split, on the calibration
images the analysis did not read (held out: what a user without test labels can check), and
the seconds of the apply. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from _table import markdown

from modhifi.data import Batches
from modhifi.metrics import evaluate
from modhifi.options import CALIBRATION_CLI
from modhifi.prune import analyse
from modhifi.zoo import open_subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.67])
    args = parser.parse_args()
    device = torch.device("cpu")
    subject = open_subject(args.model, device=device)
    dataset = subject.dataset
    read = dataset.calibration.subset(slice(0, CALIBRATION_CLI))
    held_out = dataset.calibration.subset(slice(CALIBRATION_CLI, len(dataset.calibration)))
    analysis = analyse(subject.loaded.model, Batches(read, 128, device=device), device=device,
                       input_shape=dataset.input_shape)

    def accuracy(model, split) -> float:
        return evaluate(model, split, device=device, num_classes=dataset.num_classes).accuracy

    rows = [{"MACs": "dense", "compensation": "", "test": accuracy(analysis.model, dataset.test),
             "held-out calibration": accuracy(analysis.model, held_out), "seconds": 0.0}]
    for target in args.targets:
        plan = analysis.plan(target, target_kind="macs")
        for compensation in ("refit", "sequential"):
            start = time.perf_counter()
            model = analysis.apply(plan, compensation=compensation)
            seconds = time.perf_counter() - start
            rows.append({"MACs": f"{plan.speedup_macs:.2f}x fewer", "compensation": compensation,
                         "test": accuracy(model, dataset.test),
                         "held-out calibration": accuracy(model, held_out), "seconds": seconds})
            print(rows[-1], flush=True)
    print(markdown(pd.DataFrame(rows), digits=4))
    print(f"{len(read)} calibration images read, {len(held_out)} held out; "
          f"{len(dataset.test)} test images; threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
