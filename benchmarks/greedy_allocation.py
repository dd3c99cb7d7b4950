"""Does a global allocation by greedy gain per MAC beat the uniform one at the same MACs?
(issue 16; an experiment, not a library option).

`fmnist-resnet`, 2,000 calibration images, the default greedy ranking and refit. For each
uniform plan (`--targets`, a share of the MACs), the global one removes blocks of 8 channels
(the rounding the plans use) from the tail of any group's greedy order, cheapest first: the
fidelity the 8 channels added (`--gain mean`: the mean over every output of every layer reading
the group; `sum`: the sum) per MAC they cost, until it has no more MACs than the uniform plan;
then it gives back the most valuable blocks that still fit. Both plans are applied alike (refit,
BatchNorm recalibrated) and evaluated on the whole test split.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/greedy_allocation.py [--gain mean|sum]
"""
from __future__ import annotations

import argparse
import heapq
import math

import torch

from modhifi.metrics import evaluate
from modhifi.options import FLOOR, ROUND_TO
from modhifi.prune import analyse
from modhifi.zoo import open_subject


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gain", choices=("mean", "sum"), default="mean")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.67])
    args = parser.parse_args()
    device = torch.device("cpu")
    subject = open_subject("fmnist-resnet", device=device)
    dataset = subject.dataset
    calibration = dataset.calibration.subset(slice(0, 2000)).batches(500)
    analysis = analyse(subject.loaded.model, calibration, device=device,
                       input_shape=dataset.input_shape)
    structure, ranking = analysis.structure, analysis.ranking("modhifi-greedy")
    sizes = {g.name: g.size for g in structure.groups}
    outputs = {g.name: sum(analysis.fidelity[name].w.shape[0] for name, _ in g.consumers)
               for g in structure.groups}

    def gain(group: str, kept: int) -> float:
        """What the last block of `kept` channels added, in the chosen unit."""
        added = sum(ranking[group].gain[kept - ROUND_TO:kept])
        return added / outputs[group] if args.gain == "mean" else added

    def accuracy(plan) -> float:
        return evaluate(analysis.apply(plan), dataset.test, device=device,
                        num_classes=dataset.num_classes).accuracy

    for target in args.targets:
        uniform = analysis.plan(target, target_kind="macs")
        kept, heap = dict(sizes), []

        def push(group: str) -> None:
            least = max(ROUND_TO, math.ceil(FLOOR * sizes[group]))
            if kept[group] - ROUND_TO >= least:
                fewer = {**kept, group: kept[group] - ROUND_TO}
                saved = structure.cost(kept)[0] - structure.cost(fewer)[0]
                heapq.heappush(heap, (gain(group, kept[group]) / max(saved, 1), group,
                                      kept[group]))

        for group in sizes:
            push(group)
        while structure.cost(kept)[0] > uniform.macs_after and heap:
            _, group, count = heapq.heappop(heap)
            if kept[group] == count:
                kept[group] -= ROUND_TO
                push(group)
        while True:  # give back the most valuable blocks that still fit
            fits = [(gain(g, kept[g] + ROUND_TO), g) for g in sizes if kept[g] < sizes[g]
                    and structure.cost({**kept, g: kept[g] + ROUND_TO})[0] <= uniform.macs_after]
            if not fits:
                break
            kept[max(fits)[1]] += ROUND_TO
        chosen = analysis.plan(0.0, overrides={g: 1 - kept[g] / sizes[g] for g in sizes})
        print(f"target {target}: uniform {uniform.speedup_macs:.2f}x {accuracy(uniform):.2%} | "
              f"global by {args.gain} gain per MAC {chosen.speedup_macs:.2f}x "
              f"{accuracy(chosen):.2%}", flush=True)


if __name__ == "__main__":
    main()
