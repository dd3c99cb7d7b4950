"""Half-MACs plans in multiples of 16: faster per MAC, but as accurate? (issue 16's two bars).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/aligned_plans.py [--target 0.5]

`fmnist-resnet`, 2,000 calibration images in the command line's batches of 128, the greedy
ranking and the sequential refit (the command line's defaults). Plans compared at the MACs target:
- the default plan (uniform, multiples of 8);
- uniform in multiples of 16 (the AVX-512 kernels' channel block), which overshoots the target;
- the same with blocks of 16 given back while the target still holds: the fewest MACs first
  (`prune.plan.give_back`, as a latency target does with time), or the most greedy gain per MAC
  first (an experiment, not a library option);
- the three most accurate allocations in multiples of 16 that `speed_anatomy.py --aligned 16`
  found by enumerating all 386 (ranked there by the paper's union rule with the one-shot refit,
  on the test split: they say what these shapes can do, not what a plan without the test split
  would pick; here they are re-run with the greedy ranking and the sequential refit).
Each is evaluated on the whole test split; all are timed side by side with the dense model at
batch 64 (frozen TorchScript, channels-last, median of 30 after 5 warm-up), without and with
oneDNN graph fusion. Writes docs/benchmarks/aligned_plans_fmnist-resnet.csv.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from _table import markdown
from speed_anatomy import BATCH, whole_models

from modhifi.distributed import CALIBRATION_BATCH
from modhifi.backend import choose_backend
from modhifi.metrics import evaluate
from modhifi.options import FLOOR
from modhifi.prune import analyse
from modhifi.prune.plan import give_back, kept_counts, least_knob, removed_share
from modhifi.zoo import open_subject

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16
METHOD = "modhifi-greedy"


def given_back(analysis, kept: dict[str, int], budget: float) -> dict[str, int]:
    """`kept` with blocks of BLOCK channels given back while the MACs stay within `budget`:
    each time the block whose greedy gains (as a share of its group's) per MAC are largest."""
    rankings, cost = analysis.ranking(METHOD), analysis.structure.cost

    def priority(name: str, count: int, macs: float) -> float:
        gains = rankings[name].gain
        return -sum(gains[count:count + BLOCK]) / sum(gains) / macs

    return give_back(rankings, kept, lambda more: cost(more)[0], budget=budget, round_to=BLOCK,
                     fixed={}, priority=priority)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5, help="share of the MACs to remove")
    args = parser.parse_args()
    backend = choose_backend("cpu")
    subject = open_subject("fmnist-resnet", device=backend.device)
    model, dataset = subject.loaded.model, subject.dataset
    calibration = dataset.calibration.subset(slice(0, 2000))
    analysis = analyse(model, tuple(calibration.batches(CALIBRATION_BATCH, device=backend.device)),
                       device=backend.device, input_shape=dataset.input_shape)
    rankings, structure = analysis.ranking(METHOD), analysis.structure
    default = {g.name: len(g.kept) for g in analysis.plan(args.target, target_kind="macs").groups}
    knob = least_knob(removed_share(structure, rankings, "macs", "uniform", FLOOR, BLOCK),
                      args.target, what="MACs")
    uniform = kept_counts(rankings, knob, "uniform", FLOOR, BLOCK)
    budget = (1 - args.target) * structure.macs
    plans = {"default (multiples of 8)": default, "uniform, multiples of 16": uniform,
             "multiples of 16, given back, fewest MACs first":
                 give_back(rankings, uniform, lambda kept: structure.cost(kept)[0], budget=budget,
                           round_to=BLOCK, fixed={}),
             "multiples of 16, given back, most gain per MAC first":
                 given_back(analysis, uniform, budget)}
    found = pd.read_csv(ROOT / "docs" / "benchmarks" / "speed_anatomy_fmnist-resnet_aligned16.csv")
    for rank in range(3):
        plans[f"enumerated, multiples of 16, #{rank + 1}"] = {
            g.name: int(found.iloc[rank][g.name]) for g in structure.groups}

    rows, pruned = [], []
    sizes = {g.name: g.size for g in structure.groups}
    for label, kept in plans.items():  # the greedy plan keeping exactly `kept` of each group
        plan = analysis.plan(0.0, overrides={g: 1 - kept[g] / sizes[g] for g in sizes})
        pruned.append(analysis.apply(plan, compensation="sequential"))
        accuracy = evaluate(pruned[-1], dataset.test, device=backend.device,
                            num_classes=dataset.num_classes).accuracy
        rows.append({"plan": label, "widths": "-".join(str(kept[g.name]) for g in structure.groups),
                     "macs_ratio": plan.speedup_macs, "accuracy": accuracy})
        print(rows[-1], flush=True)
    base = evaluate(model, dataset.test, device=backend.device,
                    num_classes=dataset.num_classes).accuracy
    example = torch.randn(BATCH, *dataset.input_shape)
    for fusion, column in ((False, "speedup"), (True, "speedup_fused")):
        dense_ms, *ms = whole_models([model, *pruned], example, backend, onednn_fusion=fusion)
        for row, pruned_ms in zip(rows, ms):
            row[column] = dense_ms / pruned_ms
            row[f"{column}_per_macs"] = row[column] / row["macs_ratio"]
    table = pd.DataFrame(rows).assign(drop_points=lambda t: 100 * (base - t.accuracy))
    table["device"], table["batch"] = backend.description, BATCH
    table.to_csv(ROOT / "docs" / "benchmarks" / "aligned_plans_fmnist-resnet.csv", index=False)
    print(f"dense accuracy {base:.4f}; groups {', '.join(g.name for g in structure.groups)}")
    print(markdown(table.drop(columns=["device", "batch"]), digits=3))


if __name__ == "__main__":
    main()
