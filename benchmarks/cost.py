"""What the method costs: time and peak memory of each stage as the model and the data grow.

    python benchmarks/cost.py [--device cpu] [--quick]

Stages of ModHiFi-P at half the MACs: statistics (forward passes accumulating every consumer's
input second moment), scores (fidelities and the plan), surgery, compensation (refit solves) and
BatchNorm recalibration. Models: torchvision resnet18 and resnet50 at 224×224 with random weights
and random-normal calibration images (time and memory do not depend on the values), and the zoo's
fmnist-resnet on its own data. Every configuration runs in a fresh process; peak memory is the
process's peak resident set on the CPU, and torch's peak allocation on a GPU.
Writes docs/benchmarks/cost.csv and cost.png and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _table import markdown

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # device -> (model, calibration images); the 2-core CPU gets the small end
    "cuda": (("fmnist-resnet", 256), ("fmnist-resnet", 2000), ("resnet18", 256),
             ("resnet18", 2000), ("resnet50", 256), ("resnet50", 512), ("resnet50", 2000)),
    "cpu": (("fmnist-resnet", 256), ("fmnist-resnet", 1000), ("fmnist-resnet", 2000),
            ("resnet18", 64), ("resnet18", 256), ("resnet50", 64), ("resnet50", 256)),
}
QUICK = (("fmnist-resnet", 256), ("resnet18", 32))
# The paper, ResNet-50 on ImageNet: scores 2–5 min on one GPU, compensation 60–90 min on 4 GPUs.
PAPER_SCORES_S, PAPER_COMPENSATION_S = (120, 300), (3600, 5400)


def measure(model_name: str, images: int, device_choice: str) -> dict:
    """One configuration, in this process: seconds and peak memory after every stage."""
    import torch

    from modhifi import zoo
    from modhifi.backend import choose_backend
    from modhifi.fidelity import LayerFidelity
    from modhifi.moments import collect_moments
    from modhifi.prune import Analysis, trace_structure

    backend = choose_backend(device_choice)
    device = backend.device
    if model_name in zoo.ZOO:
        subject = zoo.open_subject(model_name, device=device)
        model, shape = subject.loaded.model, subject.dataset.input_shape
        calibration = subject.dataset.calibration.subset(slice(0, images))
        batches = tuple(calibration.batches(64, device=device))
    else:
        torch.manual_seed(0)
        model, shape = zoo.build_torchvision(model_name, num_classes=1000).eval().to(device), (3, 224, 224)
        batches = tuple(torch.randn(min(64, images - i), *shape, device=device)
                        for i in range(0, images, 64))
    row = {"model": model_name, "images": images, "device": backend.description}

    def stage(name: str, work):
        backend.synchronize()
        start = time.perf_counter()
        result = work()
        backend.synchronize()
        row[f"{name}_s"] = time.perf_counter() - start
        peak = backend.peak_memory_bytes()
        row[f"{name}_peak_mib"] = (peak if peak is not None else
                                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        return result

    backend.peak_memory_reset()
    structure = trace_structure(model, shape)
    moments = stage("statistics", lambda: collect_moments(model, structure.consumers, batches,
                                                          device=device))

    def score():
        fidelity = {name: LayerFidelity.from_moments(model.get_submodule(name).weight, moments[name],
                                                     centered=name in structure.followed_by_norm)
                    for name in structure.consumers}
        analysis = Analysis(model, shape, structure, fidelity, batches, 0.0)
        return analysis, analysis.plan(0.5, target_kind="macs")

    analysis, plan = stage("scores", score)
    stage("surgery", lambda: analysis.apply(plan, compensation="none", recalibrate=False))
    stage("surgery_compensation", lambda: analysis.apply(plan, compensation="refit", recalibrate=False))
    stage("surgery_compensation_recalibration", lambda: analysis.apply(plan, compensation="refit"))
    # Stages that apply() bundles, by difference of the runs above.
    row["compensation_s"] = row["surgery_compensation_s"] - row["surgery_s"]
    row["recalibration_s"] = row["surgery_compensation_recalibration_s"] - row["surgery_compensation_s"]
    row["macs_reduction"] = plan.speedup_macs
    row["threads"] = torch.get_num_threads()
    return row


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["statistics_s", "scores_s", "surgery_s", "compensation_s", "recalibration_s"]
    labels = [f"{m}\n{n} img" for m, n in zip(table["model"], table["images"])]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    bottom = [0.0] * len(table)
    for column in stages:
        values = table[column].clip(lower=0).tolist()
        axis.bar(labels, values, bottom=bottom, label=column.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_ylabel("seconds")
    axis.set_title(f"ModHiFi-P cost per stage at ½ MACs ({table['device'].iloc[0]})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="two small configurations")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL IMAGES
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.device)))
        return
    from modhifi.backend import choose_backend

    rows, kind = [], choose_backend(args.device).device.type
    for model, images in QUICK if args.quick else CONFIGS[kind]:
        done = subprocess.run([sys.executable, __file__, "--device", args.device,
                               "--one", model, str(images)],
                              capture_output=True, text=True, cwd=ROOT, check=True)
        rows.append(json.loads(done.stdout.splitlines()[-1]))
        print(f"{model} {images}: {rows[-1]['statistics_s']:.1f} s statistics", file=sys.stderr)
    table = pd.DataFrame(rows)
    suffix = "_quick" if args.quick else ""
    out = ROOT / "docs" / "benchmarks" / f"cost{suffix}.csv"
    table.to_csv(out, index=False)
    plot(table, out.with_suffix(".png"))
    columns = ["model", "images", "statistics_s", "scores_s", "surgery_s", "compensation_s",
               "recalibration_s", "statistics_peak_mib", "surgery_compensation_recalibration_peak_mib"]
    print(markdown(table[columns], digits=2))
    resnet50 = table[table["model"] == "resnet50"]
    if len(resnet50):
        scores = resnet50["statistics_s"] + resnet50["scores_s"]
        print(f"\nresnet50: statistics + scores {scores.min():.0f}–{scores.max():.0f} s here vs "
              f"{PAPER_SCORES_S[0]}–{PAPER_SCORES_S[1]} s on one GPU in the paper; compensation "
              f"{resnet50['compensation_s'].max():.0f} s vs {PAPER_COMPENSATION_S[0]}–"
              f"{PAPER_COMPENSATION_S[1]} s on four GPUs.")


if __name__ == "__main__":
    main()
