"""The sequential refit against the one-shot refit, at issue 16's two sizes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sequential_refit.py [--model fmnist-resnet]
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sequential_refit.py --cost resnet18 resnet50

The CLI's calibration (the first 2,000 calibration images in batches of 128) and default plan
(greedy ranking, uniform, multiples of 8) at half and two-thirds of the MACs. For each
compensation (`Analysis.apply`): the accuracy on the whole test split, on the calibration
images the analysis did not read (held out), how often the pruned model's prediction on those
is the dense model's (agreement: what a user without labels can check), and the seconds of the
apply. Prints a Markdown table.

`--cost ARCH...`: only the seconds, of the analysis and of each apply at half the MACs (the
union rule, quicker to rank), for torchvision architectures with random weights on 128 random
64×64 images (BatchNorm recalibrated on them first): how the sequential refit's passes grow
with depth.

`--recordings ARCH...`: what one frontier of the sequential refit records per 224×224 image at
its largest (`prune.sequential_recordings`, 1,000 classes), and for the CLI's 2,000 images:
whether the frontiers fit `prune.apply.FRONTIER_BYTES`.
"""
from __future__ import annotations

import argparse
import sys
import time

import pandas as pd
import torch
from _table import markdown

from modhifi.data import Batches
from modhifi.metrics import evaluate, predict
from modhifi.options import CALIBRATION_CLI
from modhifi.prune import analyse, recalibrate_batchnorm, sequential_recordings, trace_structure
from modhifi.prune.apply import FRONTIER_BYTES
from modhifi.zoo import build_torchvision, open_subject


def cost(architectures: list[str]) -> None:
    torch.manual_seed(0)
    rows = []
    for arch in architectures:
        model = build_torchvision(arch, num_classes=10).eval()
        batches = [torch.randn(64, 3, 64, 64) for _ in range(2)]
        recalibrate_batchnorm(model, batches)
        start = time.perf_counter()
        analysis = analyse(model, batches, device=torch.device("cpu"), input_shape=(3, 64, 64))
        row = {"model": arch, "consumers": len(analysis.structure.consumers),
               "analyse_s": time.perf_counter() - start}
        plan = analysis.plan(0.5, target_kind="macs", method="modhifi")
        for compensation in ("refit", "sequential"):
            start = time.perf_counter()
            analysis.apply(plan, compensation=compensation)
            row[f"{compensation}_s"] = time.perf_counter() - start
        rows.append(row)
        print(row, flush=True)
    print(markdown(pd.DataFrame(rows), digits=1))


def recordings(architectures: list[str]) -> None:
    torch.manual_seed(0)
    for arch in architectures:
        model = build_torchvision(arch, num_classes=1000).eval()
        order = trace_structure(model, (3, 224, 224)).consumers
        largest = sequential_recordings(model, torch.randn(1, 3, 224, 224), order, samples=1,
                                        max_bytes=sys.maxsize).nbytes
        print(f"{arch}: {largest / 2**20:.1f} MiB per image, "
              f"{largest * CALIBRATION_CLI / 2**30:.1f} GiB for {CALIBRATION_CLI} images "
              f"(a frontier records up to {FRONTIER_BYTES / 2**30:.0f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.67])
    parser.add_argument("--cost", nargs="+", metavar="ARCH", help="torchvision architectures")
    parser.add_argument("--recordings", nargs="+", metavar="ARCH",
                        help="torchvision architectures")
    args = parser.parse_args()
    if args.cost:
        return cost(args.cost)
    if args.recordings:
        return recordings(args.recordings)
    device = torch.device("cpu")
    subject = open_subject(args.model, device=device)
    dataset = subject.dataset
    read = dataset.calibration.subset(slice(0, CALIBRATION_CLI))
    held_out = dataset.calibration.subset(slice(CALIBRATION_CLI, len(dataset.calibration)))
    analysis = analyse(subject.loaded.model, Batches(read, 128, device=device), device=device,
                       input_shape=dataset.input_shape)

    def accuracy(model, split) -> float:
        return evaluate(model, split, device=device, num_classes=dataset.num_classes).accuracy

    dense = predict(analysis.model, held_out, device=device).argmax(1)

    def agreement(model) -> float:
        return (predict(model, held_out, device=device).argmax(1) == dense).double().mean().item()

    rows = [{"MACs": "dense", "compensation": "", "test": accuracy(analysis.model, dataset.test),
             "held-out calibration": accuracy(analysis.model, held_out), "agreement": 1.0,
             "seconds": 0.0}]
    for target in args.targets:
        plan = analysis.plan(target, target_kind="macs")
        for compensation in ("refit", "sequential"):
            start = time.perf_counter()
            model = analysis.apply(plan, compensation=compensation)
            seconds = time.perf_counter() - start
            rows.append({"MACs": f"{plan.speedup_macs:.2f}x fewer", "compensation": compensation,
                         "test": accuracy(model, dataset.test),
                         "held-out calibration": accuracy(model, held_out),
                         "agreement": agreement(model), "seconds": seconds})
            print(rows[-1], flush=True)
    print(markdown(pd.DataFrame(rows), digits=4))
    print(f"{len(read)} calibration images read, {len(held_out)} held out; "
          f"{len(dataset.test)} test images; threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
