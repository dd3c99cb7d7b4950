"""ModHiFi-P against the baselines through the CLI, one fresh process per row (issue 3's table).

    python benchmarks/prune_table.py --model fmnist-resnet --targets 0.5 0.67 --kind macs \
        [--scope internal] [--round-to 16]

Every row is `python -m modhifi prune ... --json` on the full test split; writes
docs/benchmarks/prune_<model>[_internal][_r16].csv and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from _table import markdown

from modhifi.options import Scope, choices

ROOT = Path(__file__).resolve().parent.parent
ROWS = (  # (method, compensation, BatchNorm recalibration)
    ("modhifi-greedy", "refit", True), ("modhifi", "refit", True), ("modhifi", "rescale", True), ("modhifi", "none", True),
    ("l1", "none", True), ("random", "none", True), ("activation", "none", True),
    ("l1", "none", False))


def run(model: str, target: float, kind: str, scope: str, method: str, compensation: str,
        recal: bool, device: str, round_to: int) -> dict:
    command = [sys.executable, "-m", "modhifi", "prune", "--model", model, "--target", str(target),
               "--target-kind", kind, "--scope", scope, "--method", method,
               "--compensation", compensation, "--round-to", str(round_to), "--device", device,
               "--json"]
    command += [] if recal else ["--no-bn-recal"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.67])
    parser.add_argument("--kind", choices=("macs", "channels"), default="macs")
    parser.add_argument("--scope", choices=choices(Scope), default="all")
    parser.add_argument("--round-to", type=int, default=8, help="kept channels in multiples of this")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    for target in args.targets:
        for method, compensation, recal in ROWS:
            result = run(args.model, target, args.kind, args.scope, method, compensation, recal,
                         args.device, args.round_to)
            rows.append(result)
            print(f"{target} {method} {compensation} recal={recal}: "
                  f"{result['accuracy_after']:.4f} at {result['speedup_macs']:.2f}x", file=sys.stderr)
    table = pd.DataFrame(rows)
    suffix = ("" if args.scope == "all" else f"_{args.scope}") + (
        "" if args.round_to == 8 else f"_r{args.round_to}")
    out = ROOT / "docs" / "benchmarks" / f"prune_{args.model}{suffix}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    table["drop_points"] = (table["accuracy_before"] - table["accuracy_after"]) * 100
    columns = ["target", "method", "compensation", "bn_recalibrated", "round_to", "speedup_macs",
               "accuracy_after", "drop_points", "speedup_measured", "speedup_eager", "seconds"]
    print(markdown(table[columns]))


if __name__ == "__main__":
    main()
