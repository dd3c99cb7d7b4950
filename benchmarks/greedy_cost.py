"""What the greedy ranking costs on wide layers: torchvision ResNet-18 and ResNet-50 (random
weights, 32 random-normal images at 64×64; the time does not depend on the values).

For every channel group, the time of the greedy order (`modhifi-greedy`, fidelity.greedy_subset)
and of the paper's union rule (`modhifi`), from the same analysis; the statistics are not timed.
With `--orders FILE`, the greedy orders are saved (torch.save: group -> order), and with
`--compare FILE` compared with orders saved before (by another version of the code): the share
of groups whose order is the same, and the largest position any channel moved.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/greedy_cost.py [--models resnet18 resnet50]

Writes docs/benchmarks/greedy_cost.csv (one row per model and group) and prints the totals.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torchvision
from _table import markdown

from modhifi.prune import analyse
from modhifi.prune.importance import Evidence, greedy_ranking, modhifi_ranking

ROOT = Path(__file__).resolve().parent.parent


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--orders", type=Path, help="save the greedy orders here")
    parser.add_argument("--compare", type=Path, help="orders saved before, to compare with")
    args = parser.parse_args()
    rows, orders = [], {}
    for arch in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None).eval()
        analysis = analyse(model, [torch.randn(32, 3, 64, 64)], device=torch.device("cpu"),
                           input_shape=(3, 64, 64))
        evidence = Evidence(analysis.model, analysis.fidelity, 0)
        for group in analysis.structure.groups:
            _, union = timed(modhifi_ranking, group, evidence)
            ranking, greedy = timed(greedy_ranking, group, evidence)
            orders[arch, group.name] = ranking.order
            widths = [analysis.fidelity[name].w.shape for name, _ in group.consumers]
            rows.append({"model": arch, "group": group.name, "channels": group.size,
                         "consumers": len(widths),
                         "largest_d": max(c_in * k for _, c_in, k in widths),
                         "union_s": union, "greedy_s": greedy})
    frame = pd.DataFrame(rows)
    out = ROOT / "docs" / "benchmarks" / "greedy_cost.csv"
    frame.to_csv(out, index=False, float_format="%.4f")
    totals = frame.groupby("model")[["union_s", "greedy_s"]].sum().reset_index()
    print(markdown(totals, 2))
    print(f"threads: {torch.get_num_threads()}; per group: {out.relative_to(ROOT)}")
    if args.orders:
        torch.save(orders, args.orders)
    if args.compare:
        before = torch.load(args.compare)
        same = [key for key in orders if before.get(key) == orders[key]]
        moved = max(max(abs(list(before[key]).index(c) - position)
                        for position, c in enumerate(orders[key]))
                    for key in orders if key in before)
        print(f"the same order in {len(same)} of {len(orders)} groups; "
              f"largest move of a channel: {moved} positions")


if __name__ == "__main__":
    main()
