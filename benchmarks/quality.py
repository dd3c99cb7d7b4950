"""Accuracy against MACs reduction, no fine-tuning, at equal MACs (issue 5, item 1).

Our rows go through the library: one `analyse` per model, then `plan` (a MACs target, uniform
allocation) and `apply` per target, for ModHiFi-P with each compensation (refit, rescale, none),
its greedy subset selection (`modhifi-greedy`, refit) and the baselines (L1, random, activation;
no compensation), each with and without BatchNorm recalibration (the paper's ablation). Torch-Pruning's own pruners (magnitude L1/L2, LAMP,
activation, and Taylor, which needs gradients and labels: an upper reference) prune the same
groups at the ratio whose MACs come closest to our plan's (benchmarks/_torch_pruning.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py             # 3 models, 8 targets
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality.py --quick     # see --help

Writes docs/benchmarks/quality_<model>.csv (rewritten after every row), .png (accuracy against
the actual MACs reduction) and .md (the command, the machine and the accuracy table).
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import matplotlib
import pandas as pd
import torch
from _table import markdown
from _torch_pruning import IMPORTANCES, matched_ratio, prune
from matplotlib.figure import Figure  # no pyplot: renders with Agg, no display
from torch import nn

from modhifi.backend import choose_backend
from modhifi.errors import UserError
from modhifi.metrics import count_cost, evaluate
from modhifi.options import DeviceChoice, choices
from modhifi.prune import analyse, recalibrate_batchnorm
from modhifi.zoo import open_subject, write_atomically

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("fmnist-resnet", "fmnist-vgg", "fmnist-vit")
TARGETS = (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)  # MACs reduction factors
QUICK = {"models": ("fmnist-resnet",), "targets": (1.25, 2.0, 4.0), "test_images": 2000}
OURS = (("modhifi-greedy", "refit"), ("modhifi", "refit"), ("modhifi", "rescale"),
        ("modhifi", "none"), ("l1", "none"), ("random", "none"), ("activation", "none"))
COLUMNS = ("model", "method", "compensation", "bn_recalibrated", "needs_labels", "target_factor",
           "macs_reduction", "macs", "accuracy", "seconds", "error")


def run_model(name: str, targets: tuple[float, ...], *, device: torch.device, calib_samples: int,
              test_images: int | None, round_to: int, out: Path) -> tuple[pd.DataFrame, dict]:
    """Every row for one model; the CSV at `out` is rewritten after each. Returns rows and facts."""
    subject = open_subject(name, device=device)
    model, dataset = subject.loaded.model, subject.dataset
    shape = dataset.input_shape
    calibration = dataset.calibration.subset(slice(0, calib_samples))
    images = list(calibration.batches(500, device=device))  # as the CLI's `prune` feeds analyse
    labelled = list(calibration.batches(500, device=device, labels=True))
    test = dataset.test if test_images is None else dataset.test.subset(slice(0, test_images))
    dense_macs = count_cost(model, shape).macs
    # Without BatchNorm, recalibration changes nothing: those rows would be duplicates.
    recals = ((True, False) if any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                   for m in model.modules()) else (False,))
    rows: list[dict] = []

    def measure(build: Callable[[], nn.Module], *, seconds_before: float = 0.0,
                **fields) -> tuple[nn.Module | None, float]:
        """Build, cost and evaluate one row; a failure becomes a row with its error."""
        start = time.process_time()
        try:
            pruned = build()
            seconds = seconds_before + time.process_time() - start
            macs = count_cost(pruned, shape).macs
            accuracy = evaluate(pruned, test, device=device,
                                num_classes=dataset.num_classes).accuracy
            row = dict(fields, macs_reduction=dense_macs / macs, macs=macs, accuracy=accuracy,
                       seconds=seconds, error="")
        except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
            pruned, seconds = None, math.nan
            row = dict(fields, macs_reduction=math.nan, macs=math.nan, accuracy=math.nan,
                       seconds=math.nan, error=f"{type(error).__name__}: {error}")
        rows.append({"model": name, **row})
        frame = pd.DataFrame(rows, columns=COLUMNS)
        write_atomically(out, lambda p: frame.to_csv(p, index=False))
        _progress(f"{name} {row['target_factor']:g}x {row['method']} {row['compensation']} "
                  f"recal={row['bn_recalibrated']}: accuracy {row['accuracy']:.4f} at "
                  f"{row['macs_reduction']:.2f}x, {row['seconds']:.1f} s {row['error']}")
        return pruned, seconds

    def cut(method: str, ratio: float | Exception) -> nn.Module:
        if isinstance(ratio, Exception):  # the MACs bisection failed: every row says why
            raise ratio
        return prune(model, method, ratio, structure=analysis.structure, input_shape=shape,
                     calibration=labelled, round_to=round_to)

    _progress(f"{name}: dense accuracy on {len(test)} test images")
    dense = evaluate(model, test, device=device, num_classes=dataset.num_classes).accuracy
    start = time.process_time()
    analysis = analyse(model, images, device=device, input_shape=shape)
    analysis_seconds = time.process_time() - start
    _progress(f"{name}: dense {dense:.4f}, analysis {analysis_seconds:.1f} s")
    skipped = []
    for factor in targets:
        try:
            plans = {m: analysis.plan(1 - 1 / factor, target_kind="macs", method=m,
                                      round_to=round_to) for m in dict(OURS)}
        except UserError as error:  # a target this model's prunable groups cannot reach
            skipped.append(f"{factor:g}×: {error}")
            _progress(f"{name} {factor:g}x skipped: {error}")
            continue
        for method, compensation in OURS:
            for recal in recals:
                measure(partial(analysis.apply, plans[method], compensation=compensation,
                                recalibrate=recal),
                        method=method, compensation=compensation, bn_recalibrated=recal,
                        needs_labels=False, target_factor=factor)
        # Under uniform allocation our methods share the channel counts, hence the MACs.
        try:
            ratio = matched_ratio(model, plans["modhifi"].macs_after, structure=analysis.structure,
                                  input_shape=shape, round_to=round_to)[0]
        except Exception as error:  # noqa: BLE001 - reported on each Torch-Pruning row
            ratio = error
        for method, (_, needs_labels) in IMPORTANCES.items():
            fields = {"method": method, "compensation": "none", "needs_labels": needs_labels,
                      "target_factor": factor}
            pruned, seconds = measure(partial(cut, method, ratio), bn_recalibrated=False, **fields)
            if pruned is not None and True in recals:  # the same cut, then BatchNorm recalibrated
                measure(partial(_recalibrated, pruned, images), bn_recalibrated=True,
                        seconds_before=seconds, **fields)
    facts = {"dense": dense, "analysis_seconds": analysis_seconds, "round_to": round_to,
             "calib_samples": len(calibration), "test_images": len(test), "skipped": skipped}
    return pd.DataFrame(rows, columns=COLUMNS), facts


def _recalibrated(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """A copy of `model` with BatchNorm statistics re-estimated on `batches`."""
    model = copy.deepcopy(model)
    recalibrate_batchnorm(model, batches)
    return model


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy in % by row kind (rows: BN recal first, ours, then Torch-Pruning's) and target."""
    keys = ["method", "compensation", "bn_recalibrated", "needs_labels"]
    pivot = (rows.assign(accuracy=rows["accuracy"] * 100)
             .groupby([*keys, "target_factor"], sort=False)["accuracy"].mean()
             .unstack("target_factor"))
    pivot.columns = [f"{factor:g}×" for factor in pivot.columns]
    pivot["s/row"] = rows.groupby(keys, sort=False)["seconds"].mean()
    methods = [m for m, _ in OURS] + list(IMPORTANCES)
    compensations = ["refit", "rescale", "none"]
    order = sorted(pivot.index, key=lambda k: (not k[2], methods.index(k[0]),
                                               compensations.index(k[1])))
    return pivot.loc[order].reset_index().rename(
        columns={"bn_recalibrated": "BN recal", "needs_labels": "labels"})


def macs_line(rows: pd.DataFrame) -> str:
    """The actual MACs reductions per target, ours and Torch-Pruning's (matched to ours)."""
    parts = []
    for factor, group in rows.dropna(subset=["macs_reduction"]).groupby("target_factor"):
        theirs = group["method"].str.startswith("tp-")
        parts.append(f"{factor:g}×: ours {_span(group[~theirs]['macs_reduction'])}, "
                     f"Torch-Pruning {_span(group[theirs]['macs_reduction'])}")
    return "; ".join(parts)


def _span(values: pd.Series) -> str:
    if values.empty:
        return "–"
    low, high = values.min(), values.max()
    return f"{low:.2f}" if math.isclose(low, high, rel_tol=1e-6) else f"{low:.2f}–{high:.2f}"


def plot(rows: pd.DataFrame, *, model: str, dense: float, test_images: int, out: Path) -> None:
    """Accuracy against the actual MACs reduction, one line per row kind, a panel per BN setting."""
    panels = sorted(rows["bn_recalibrated"].unique(), reverse=True)
    figure = Figure(figsize=(7 * len(panels) + 2, 5.5), layout="constrained")
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    kinds = list(dict.fromkeys(zip(rows["method"], rows["compensation"])))
    colours = [*matplotlib.colormaps["tab10"].colors, "#444444"]
    for axis, recal in zip(axes, panels):
        for i, (method, compensation) in enumerate(kinds):
            line = rows[(rows["method"] == method) & (rows["compensation"] == compensation)
                        & (rows["bn_recalibrated"] == recal)].dropna(subset=["accuracy"])
            if line.empty:
                continue
            line = line.sort_values("macs_reduction")
            theirs = method.startswith("tp-")
            axis.plot(line["macs_reduction"], line["accuracy"] * 100,
                      marker="x" if method == "tp-lamp" else "s" if theirs else "o", markersize=4,
                      linestyle="--" if theirs else "-",
                      linewidth=2.2 if method.startswith("modhifi") else 1.2,
                      color=colours[i % len(colours)],
                      label=f"{method} ({compensation})" if method.startswith("modhifi") else method)
        axis.axhline(dense * 100, color="black", linestyle=":", linewidth=1.2, label="dense")
        axis.set_xlabel("MACs reduction (dense MACs / pruned MACs)")
        axis.set_title("with BatchNorm recalibration" if recal else
                       "without BatchNorm recalibration" if len(panels) > 1 else "no BatchNorm")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 accuracy, % ({test_images} test images)")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    figure.suptitle(f"{model}: accuracy against MACs reduction, no fine-tuning, equal MACs")
    write_atomically(out, lambda p: figure.savefig(p, dpi=120, format="png"))


def report(rows: pd.DataFrame, facts: dict, *, model: str, command: str, machine: str,
           seconds: float) -> str:
    """The Markdown for docs/results.md: command, machine, accuracy table, notes."""
    errors = rows[rows["error"] != ""].drop_duplicates(["method", "error"])
    lines = [
        f"### {model}: accuracy (%) at equal MACs, no fine-tuning", "",
        f"`{command}`", "",
        (f"Machine: {machine}. Dense accuracy {facts['dense'] * 100:.2f}% on "
         f"{facts['test_images']} test images; {facts['calib_samples']} calibration images "
         f"(unlabelled, except for Taylor). Whole run {seconds / 60:.1f} CPU minutes."), "",
        markdown(table(rows), digits=2), "",
        f"Actual MACs reduction per target: {macs_line(rows)}.", "",
        "Notes:",
        (f"- Our statistics and scores (`analyse`, once per model) took "
         f"{facts['analysis_seconds']:.1f} s; `s/row` is `apply` (compensate, cut, recalibrate) "
         "for our rows, importance + cut (+ recalibration) for Torch-Pruning's (the MACs "
         "bisection and the evaluation excluded). All times are CPU seconds of this process "
         "(the machine is shared, so wall-clock times would count other people's work)."),
        ("- Torch-Pruning rows: `tp.pruner.BasePruner` (`MetaPruner` is its alias in 1.6), "
         f"`global_pruning=False`, `round_to={facts['round_to']}` (ours rounds the same way), "
         "only the groups ours prunes, no compensation; the pruning ratio is bisected so "
         "that its MACs come closest to our plan's. `ActivationImportance` exists in this "
         "version and is used as is (mean |input| of each consumer over all calibration "
         "images); Taylor accumulates gradients of the cross-entropy over the labelled "
         "calibration images, as Torch-Pruning's own benchmark does (`labels` = True)."),
        ("- LAMP only re-normalises scores within a group (order-preserving), so with "
         "uniform allocation it cuts the same channels as the L2 magnitude.")]
    lines += [f"- Not reached, skipped: {s}" for s in facts["skipped"]]
    lines += [f"- Failed: {r.method} ({r.compensation}, {r.target_factor:g}×): {r.error}"
              for r in errors.itertuples()]
    return "\n".join(lines) + "\n"


def _progress(line: str) -> None:
    print(f"quality: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", help=f"zoo models (default: {' '.join(MODELS)})")
    parser.add_argument("--targets", type=float, nargs="+",
                        help="MACs reduction factors, e.g. 2 for half the MACs "
                             f"(default: {' '.join(map(str, TARGETS))})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['models'][0]} only, targets "
                             f"{' '.join(map(str, QUICK['targets']))}, the first "
                             f"{QUICK['test_images']} test images; files named *_quick")
    parser.add_argument("--calib-samples", type=int, default=2000,
                        help="unlabelled calibration images, as the CLI's prune (default 2000)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="kept channels per group rounded to a multiple of this, ours and "
                             "Torch-Pruning's alike (default 1: with the library's 8, the "
                             "32-channel groups allow four widths, targets collapse onto the same "
                             "plan and Torch-Pruning, which rounds down, cannot match our MACs)")
    parser.add_argument("--device", default="cpu", choices=choices(DeviceChoice))
    args = parser.parse_args(argv)
    models = args.model or (QUICK["models"] if args.quick else MODELS)
    targets = tuple(args.targets or (QUICK["targets"] if args.quick else TARGETS))
    test_images = QUICK["test_images"] if args.quick else None
    backend = choose_backend(args.device)
    threads = os.environ.get("OMP_NUM_THREADS")
    machine = (f"{os.cpu_count()}-core CPU, OMP_NUM_THREADS={threads or 'unset'} "
               f"({backend.description}), torch {torch.__version__.split('+')[0]}, "
               f"torch-pruning {importlib.metadata.version('torch-pruning')}")
    command = shlex.join([".venv/bin/python", "benchmarks/quality.py",
                          *(sys.argv[1:] if argv is None else argv)])
    command = f"OMP_NUM_THREADS={threads} {command}" if threads else command
    if args.quick:
        _progress(f"quick: {', '.join(models)}, targets {targets}, first {test_images} test images")
    for model in models:
        suffix = ("_quick" if args.quick else "") + (
            f"_round{args.round_to}" if args.round_to != 1 else "")
        stem = ROOT / "docs" / "benchmarks" / f"quality_{model}{suffix}"
        start = time.process_time()
        rows, facts = run_model(model, targets, device=backend.device,
                                calib_samples=args.calib_samples, test_images=test_images,
                                round_to=args.round_to, out=stem.with_suffix(".csv"))
        if rows["accuracy"].notna().any():
            plot(rows, model=model, dense=facts["dense"], test_images=facts["test_images"],
                 out=stem.with_suffix(".png"))
        text = report(rows, facts, model=model, command=command, machine=machine,
                      seconds=time.process_time() - start)
        write_atomically(stem.with_suffix(".md"), partial(Path.write_text, data=text))
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
