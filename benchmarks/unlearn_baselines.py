"""ModHiFi-U against gradient-based unlearning at the same wall time (issue 5, item 4).

For every class of a zoo model: ModHiFi-U with the library's defaults (no labels beyond the forget
class, no gradients), then two baselines that need labels and gradients, each given ModHiFi-U's
wall time for that class as its budget:

- `gradient_ascent`: maximise the cross-entropy of the forget-class calibration images (SGD,
  lr 3e-5, momentum 0.9, batches of 64), stopping early once a whole batch is misclassified;
- `finetune_retain`: minimise the cross-entropy of the other classes' calibration images (SGD,
  lr 1e-2, momentum 0.9, batches of 64), which forgets only by not seeing the class.

Both train with BatchNorm statistics frozen (eval mode), so only weights change, as in ModHiFi-U.
Every model is audited the same way (`modhifi.audit.audit`: forget / retain accuracy on the full
test split, membership-attack AUC, linear-probe accuracy on the forget class). Writes
docs/benchmarks/unlearn_baselines_<model>.csv, docs/benchmarks/unlearn_baselines.png and
docs/benchmarks/unlearn_baselines.md (`--quick`: 2 classes of fmnist-resnet, into a temporary
directory unless --out-dir is given).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unlearn_baselines.py --models fmnist-resnet fmnist-vgg
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from _table import markdown
from torch import nn

from modhifi.audit import audit, model_outputs
from modhifi.backend import choose_backend
from modhifi.data import Dataset, Split
from modhifi.options import DeviceChoice, choices
from modhifi.unlearn import other_classes, unlearn
from modhifi.zoo import open_subject

ROOT = Path(__file__).resolve().parent.parent
QUICK_CLASSES = (0, 6)  # T-shirt/top, and Shirt (the hardest class of fmnist-resnet)


@dataclass(frozen=True)
class Baseline:
    """A gradient-based unlearning baseline: which images, which direction, which step size."""

    name: str
    ascend: bool  # True: maximise the loss (forget images); False: minimise it (retain images)
    lr: float  # every baseline reads labels and gradients; ModHiFi-U reads neither


# Gradient ascent's lr was chosen on calibration images only (classes 0 and 6 of fmnist-resnet,
# 6 s budget): of 1e-3, 3e-4, 1e-4 and 3e-5 all forget every calibration image of the class, and
# the smallest keeps the most retain predictions (agreement 0.24, 0.71, 0.80, 0.84 for class 0).
BASELINES = (Baseline("gradient_ascent", ascend=True, lr=3e-5),
             Baseline("finetune_retain", ascend=False, lr=1e-2))


def run_baseline(model: nn.Module, images: Split, baseline: Baseline, *, budget_s: float,
                 device: torch.device, batch_size: int = 64, seed: int = 0,
                 max_steps: int | None = None) -> tuple[nn.Module, int, float]:
    """Train a copy of `model` on `images` for `budget_s` seconds or `max_steps` SGD steps,
    whichever comes first (BatchNorm frozen).

    Returns:
        (the trained copy, SGD steps taken, seconds spent).
    """
    trained = copy.deepcopy(model).eval()  # eval: BatchNorm statistics stay as trained
    trained.requires_grad_(True)
    optimizer = torch.optim.SGD(trained.parameters(), lr=baseline.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    begin, steps = time.perf_counter(), 0
    for _ in itertools.count():
        order = torch.randperm(len(images), generator=generator)
        for index in order.split(batch_size):
            x = images.normalise(images.images[index].to(device))  # (b, C, H, W)
            y = images.labels[index].to(device)  # (b,)
            logits = trained(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            (-loss if baseline.ascend else loss).backward()
            optimizer.step()
            steps += 1
            # A whole batch misclassified, never the short remainder batch of an epoch.
            full = len(y) == min(batch_size, len(images))
            forgotten = baseline.ascend and full and bool((logits.argmax(1) != y).all())
            if forgotten or steps == max_steps or time.perf_counter() - begin >= budget_s:
                trained.zero_grad(set_to_none=True)
                return trained, steps, time.perf_counter() - begin


def row(model_name: str, method: str, needs_labels: bool, forget_class: int, dataset: Dataset,
        before, after, *, seconds: float, steps: int | None, budget_s: float) -> dict:
    return {"model": model_name, "method": method, "needs_labels": needs_labels,
            "forget_class": forget_class, "class_name": dataset.classes[forget_class],
            "forget_accuracy": after.forget_accuracy, "retain_accuracy": after.retain_accuracy,
            "retain_drop": before.retain_accuracy - after.retain_accuracy,
            "test_accuracy": after.test_accuracy, "mia_auc": after.mia_auc,
            "probe_forget_accuracy": after.probe_forget_accuracy, "seconds": seconds,
            "steps": steps, "budget_seconds": budget_s}


def compare(model_name: str, classes: list[int] | None, *, device_name: str) -> pd.DataFrame:
    """One row per (class, method): ModHiFi-U, then each baseline at ModHiFi-U's wall time."""
    backend = choose_backend(device_name)
    subject = open_subject(model_name, device=backend.device)
    model, dataset = subject.loaded.model, subject.dataset
    before_outputs = model_outputs(model, dataset, device=backend.device)
    rows = []
    for forget_class in classes if classes is not None else range(dataset.num_classes):
        result = unlearn(model, dataset, forget_class=forget_class, device=backend.device,
                         before=before_outputs)
        budget = result.seconds
        rows.append(row(model_name, "modhifi_u", False, forget_class, dataset, result.before,
                        result.after, seconds=budget, steps=None, budget_s=budget))
        calibration = dataset.calibration
        images = {True: calibration.subset(calibration.labels == forget_class),
                  False: other_classes(calibration, forget_class=forget_class, samples=None)}
        for baseline in BASELINES:
            trained, steps, seconds = run_baseline(model, images[baseline.ascend], baseline,
                                                   budget_s=budget, device=backend.device)
            after = audit(trained, dataset, forget_class=forget_class, device=backend.device)
            rows.append(row(model_name, baseline.name, True, forget_class,
                            dataset, result.before, after, seconds=seconds, steps=steps,
                            budget_s=budget))
        for r in rows[-1 - len(BASELINES):]:
            print(f"{model_name} class {forget_class} {r['method']:16s} forget "
                  f"{r['forget_accuracy']:.4f} retain {r['retain_accuracy']:.4f} "
                  f"mia {r['mia_auc']:.3f} probe {r['probe_forget_accuracy']:.3f} "
                  f"{r['seconds']:.2f} s", flush=True)
    return pd.DataFrame(rows)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model and method: mean/max forget accuracy, retain drop (points), MIA, probe, seconds."""
    grouped = frame.groupby(["model", "method"], sort=False)
    return pd.DataFrame({
        "needs_labels": grouped["needs_labels"].first(),
        "forget_mean": grouped["forget_accuracy"].mean(),
        "forget_max": grouped["forget_accuracy"].max(),
        "classes_le_1pct": grouped["forget_accuracy"].apply(lambda a: int((a <= 0.01).sum())),
        "retain_drop_mean_pts": grouped["retain_drop"].mean() * 100,
        "retain_drop_max_pts": grouped["retain_drop"].max() * 100,
        "mia_auc_mean": grouped["mia_auc"].mean(),
        "probe_forget_mean": grouped["probe_forget_accuracy"].mean(),
        "seconds_mean": grouped["seconds"].mean()}).reset_index()


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Forget vs retain accuracy, one point per class and method, one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(frame["model"]))
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        for (method, part), marker in zip(frame[frame["model"] == name].groupby("method", sort=False),
                                          "os^"):
            ax.scatter(part["forget_accuracy"], part["retain_accuracy"], label=method,
                       marker=marker, alpha=0.8)
        ax.set(title=name, xlabel="forget-class test accuracy (lower is better)",
               ylabel="retain test accuracy", xlim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("Class unlearning at equal wall time (one point per forgotten class)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_markdown(frame: pd.DataFrame, path: Path, *, command: str, quick: bool) -> None:
    per_class = frame.assign(retain_drop=frame["retain_drop"] * 100)[
        ["model", "forget_class", "class_name", "method", "forget_accuracy", "retain_accuracy",
         "retain_drop", "mia_auc", "probe_forget_accuracy", "seconds", "steps"]]
    text = [
        "# ModHiFi-U against gradient-based unlearning at equal wall time",
        "",
        f"Generated by `{command}`{' (quick mode: 2 classes)' if quick else ''}. Machine: a "
        "2-core CPU shared with other jobs, `OMP_NUM_THREADS=1` (torch uses 1 thread).",
        "",
        "- `modhifi_u`: `modhifi.unlearn.unlearn` with its defaults (contrastive centred saliency, "
        "number of layers and k chosen on calibration images, zero/negate edit; no labels beyond "
        "the forget class, no gradients). Its wall time for a class is the budget of both "
        "baselines for that class.",
        "- `gradient_ascent` (needs labels and gradients): SGD (lr 3e-5, momentum 0.9, batches "
        "of 64) *ascending* the cross-entropy of the forget-class calibration images until the "
        "budget is spent or a whole batch is misclassified. The lr was chosen on calibration "
        "images only (classes 0 and 6 of fmnist-resnet): of 1e-3, 3e-4, 1e-4, 3e-5, all forget "
        "the calibration images within the budget and the smallest changes the fewest retain "
        "predictions.",
        "- `finetune_retain` (needs labels and gradients): SGD (lr 1e-2, momentum 0.9, batches "
        "of 64) on the other classes' calibration images for the whole budget.",
        "- Both baselines train with BatchNorm statistics frozen (eval mode). Audits: full "
        "Fashion-MNIST test split; MIA = cross-validated AUC of a logistic-regression attack "
        "on loss/confidence/entropy, forget-class training images vs forget-class test images "
        "(0.5 = cannot tell); probe = linear probe on penultimate features, accuracy on the "
        "forget class (high = the class is still in the representation).",
        "",
        "## Summary (retain drop in points; forget accuracy as a fraction)",
        "",
        markdown(summary(frame), digits=3),
        "",
        "![forget vs retain accuracy](unlearn_baselines.png)",
        "",
        "## Per class",
        "",
        markdown(per_class, digits=3),
        "",
    ]
    path.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fmnist-resnet"])
    parser.add_argument("--classes", help="comma-separated class indices (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"classes {QUICK_CLASSES} of fmnist-resnet into a temporary directory")
    parser.add_argument("--device", default="cpu", choices=choices(DeviceChoice))
    parser.add_argument("--out-dir", type=Path,
                        help="where the CSVs, PNG and Markdown go (default: docs/benchmarks)")
    args = parser.parse_args(argv)
    models = ["fmnist-resnet"] if args.quick else args.models
    classes = (list(QUICK_CLASSES) if args.quick else
               [int(c) for c in args.classes.split(",")] if args.classes else None)
    out = args.out_dir or (Path(tempfile.mkdtemp(prefix="unlearn-baselines-")) if args.quick
                           else ROOT / "docs" / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads: {torch.get_num_threads()}; writing to {out}", file=sys.stderr)

    frames = []
    for name in models:
        frame = compare(name, classes, device_name=args.device)
        frame.to_csv(out / f"unlearn_baselines_{name}.csv", index=False, float_format="%.4f")
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    plot(frame, out / "unlearn_baselines.png")
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unlearn_baselines.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    write_markdown(frame, out / "unlearn_baselines.md", command=command.strip(), quick=args.quick)
    print(markdown(summary(frame), digits=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
