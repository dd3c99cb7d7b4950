"""Which torchvision classification architectures ModHiFi-P prunes end to end, and how long each
stage takes (issue 13).

    python benchmarks/coverage.py [--only resnet18 vit_b_16 ... [--update]] [--timeout 600] [--quick]

For every builder of `torchvision.models.list_models(module=torchvision.models)`, in a fresh
process: random weights, 10 classes, 16 random images at 64×64 (or the architecture's minimum
size from its weights' metadata, e.g. 224 for ViTs) as calibration data, then analyse → plan at
half the MACs → apply (refit, BatchNorm recalibration) → forward. Checked: the planned MACs equal
those counted on the pruned model, and a plan that removes nothing reproduces the dense outputs.
A model fails when any stage raises, a check fails, it runs past `--timeout` seconds, or its
resident memory passes `--max-gib`. Writes docs/benchmarks/coverage.csv and coverage.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _table import markdown

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"


def input_size(name: str) -> int:
    """64, or the smallest input the architecture accepts (its weights' `min_size`)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
        least = max(next(iter(weights)).meta.get("min_size", (1, 1)))
    except (ValueError, StopIteration):
        least = 1
    if name.startswith(("vit_", "maxvit")):
        return 224  # position embeddings fix the size (vit_h_14's weights alone ask for 518)
    return max(64, least)


def one(name: str, *, images: int = 16, size: int | None = None) -> dict:
    """Analyse, plan and apply one architecture on `images` random calibration images of
    `size` pixels (default `input_size(name)`); the row of the coverage table."""
    import torch
    import torchvision

    from modhifi.metrics import count_cost
    from modhifi.prune import analyse

    torch.manual_seed(0)
    row: dict = {"model": name}
    begin = time.perf_counter()
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    size = size or input_size(name)
    shape = (3, size, size)
    row.update(input=size, images=images, threads=torch.get_num_threads(), params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
               build_s=time.perf_counter() - begin)
    batches = list(torch.randn(images, *shape).split(8))
    begin = time.perf_counter()
    analysis = analyse(model, batches, device=torch.device("cpu"), input_shape=shape)
    row.update(analyse_s=time.perf_counter() - begin, groups=len(analysis.structure.groups),
               channels=sum(g.size for g in analysis.structure.groups))
    begin = time.perf_counter()
    plan = analysis.plan(0.5, target_kind="macs")
    row["plan_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    pruned = analysis.apply(plan, compensation="refit")
    row["apply_s"] = time.perf_counter() - begin
    with torch.inference_mode():
        out = pruned(batches[0][:2])
    measured = count_cost(pruned, shape).macs
    unpruned = analysis.apply(analysis.plan(0.0), compensation="none", recalibrate=False)
    with torch.inference_mode():
        same = torch.allclose(unpruned(batches[0]), model(batches[0]), rtol=1e-4, atol=1e-4)
    row.update(macs_before=plan.macs_before, macs_after=plan.macs_after, macs_measured=measured,
               speedup_macs=plan.speedup_macs, output_ok=tuple(out.shape) == (2, 10),
               unpruned_same=same)
    row["status"] = "ok" if measured == plan.macs_after and same and row["output_ok"] else "wrong"
    return row


def _run(name: str, timeout: float, max_gib: float, extra: list[str]) -> dict:
    """`one(name)` in a fresh process, killed past `timeout` seconds or `max_gib` resident."""
    process = subprocess.Popen([sys.executable, __file__, "--one", name, *extra], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    begin, peak = time.perf_counter(), 0.0
    while process.poll() is None:
        peak = max(peak, _resident_gib(process.pid))
        if time.perf_counter() - begin > timeout or peak > max_gib:
            process.kill()
            process.communicate()
            why = "timeout" if time.perf_counter() - begin > timeout else "memory"
            return {"model": name, "status": why, "peak_gib": peak,
                    "message": f"stopped after {time.perf_counter() - begin:.0f} s at "
                               f"{peak:.1f} GiB resident"}
        time.sleep(0.2)
    out, err = process.communicate()
    lines = out.strip().splitlines()
    if process.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "peak_gib": peak}
    last = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    return {"model": name, "status": "error", "peak_gib": peak, "message": last[0][:300]}


def _resident_gib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 2**20 for line in status.splitlines()
                 if line.startswith("VmRSS")), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="these builders only")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--max-gib", type=float, default=16)
    parser.add_argument("--quick", action="store_true", help="five small builders")
    parser.add_argument("--update", action="store_true",
                        help="with --only: replace those builders' rows of coverage.csv")
    parser.add_argument("--images", type=int, default=16, help="random calibration images")
    parser.add_argument("--size", type=int, help="input size (default: 64 or the minimum)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model, this process
    args = parser.parse_args()
    if args.one:
        from modhifi.errors import UserError

        try:
            row = one(args.one, images=args.images, size=args.size)
        except UserError as error:  # the one-line message a user would see
            row = {"model": args.one, "status": "refused", "message": str(error)}
        print(json.dumps(row))
        return
    import torchvision

    names = args.only or torchvision.models.list_models(module=torchvision.models)
    if args.quick:
        names = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_x_400mf",
                 "squeezenet1_0"]
    rows = []
    for name in names:
        extra = ["--images", str(args.images)] + (["--size", str(args.size)] if args.size else [])
        rows.append(_run(name, args.timeout, args.max_gib, extra))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    if args.update:  # the whole table with these builders' rows measured again
        kept = pd.read_csv(OUT / "coverage.csv")
        table = pd.concat([kept[~kept.model.isin(names)], table]).sort_values("model")
    write(table, "" if args.update or not (args.quick or args.only) else "_quick")


def write(table: pd.DataFrame, suffix: str = "") -> None:
    """coverage{suffix}.csv and .md under docs/benchmarks, with the summary line."""
    table.to_csv(OUT / f"coverage{suffix}.csv", index=False)
    counts = table.status.value_counts().to_dict()
    summary = (f"{counts.get('ok', 0)} of {len(table)} classification builders pruned end to end; "
               + ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "ok"))
    columns = [c for c in ("model", "status", "input", "params_m", "groups", "analyse_s", "plan_s",
                           "apply_s", "speedup_macs", "peak_gib", "message") if c in table]
    (OUT / f"coverage{suffix}.md").write_text(summary + "\n\n" + markdown(table[columns], 2) + "\n")
    print(summary)

if __name__ == "__main__":
    main()
