"""Statistics on more than one process (issue 17): how long the input statistics take (every
consumer's moments, collected and summed over the processes) with 1 and 2 processes of one
thread each on this machine, and what one all-reduce of them weighs for ResNet-50.

    .venv/bin/python benchmarks/distributed.py            # starts torchrun itself

Models: `fmnist-resnet` on 2,048 calibration images (batches of 128), torchvision ResNet-18 at
224×224 (random weights, 64 random images in batches of 16: the cost of statistics does not
depend on the weights). Each run is timed on every process from a barrier to the end of the
sum, and the slowest process counts. Scaling efficiency = t1 / (N · tN). Writes
docs/benchmarks/distributed.csv and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from _table import markdown

ROOT = Path(__file__).resolve().parent.parent
CASES = {"fmnist-resnet": (2048, 128), "resnet18@224": (64, 16)}  # images, batch


def _model_and_batches(case: str):
    from modhifi.prune.structure import trace_structure
    from modhifi.zoo import build_torchvision, open_subject

    images, batch = CASES[case]
    if case == "fmnist-resnet":
        subject = open_subject(case, device=torch.device("cpu"))
        split = subject.dataset.calibration.subset(slice(0, images))
        model, shape = subject.loaded.model, subject.dataset.input_shape
        batches = list(split.batches(batch))
    else:
        model, shape = build_torchvision("resnet18", num_classes=1000).eval(), (3, 224, 224)
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(batch, *shape, generator=generator) for _ in range(images // batch)]
    return model, trace_structure(model, shape).consumers, batches


def worker(case: str, out: Path) -> None:
    """One process of a torchrun: time the statistics of its share, write the slowest time."""
    from modhifi import distributed
    from modhifi.backend import choose_backend
    from modhifi.moments import collect_moments

    shard = distributed.from_environment(choose_backend("cpu"))
    model, consumers, batches = _model_and_batches(case)
    mine = list(shard.take(batches))
    if shard.world > 1:
        dist.barrier()
    start = time.perf_counter()
    moments = collect_moments(model, consumers, mine, device="cpu")
    summed = {name: moments[name].summed(shard) for name in consumers}
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if shard.world > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    floats = sum(m.second.numel() + m.position_sum.numel() + 1 for m in summed.values())
    if shard.is_main:
        out.write_text(f"{seconds.item()},{floats * 8},{sum(len(b) for b in batches)}\n")
    distributed.leave()


def reduce_bytes(arch: str, shape: tuple[int, ...]) -> int:
    """Bytes of one float64 all-reduce of every consumer's moments (d² + L·d + 1 each)."""
    from modhifi.moments import collect_moments
    from modhifi.prune.structure import trace_structure
    from modhifi.zoo import build_torchvision

    model = build_torchvision(arch, num_classes=1000).eval()
    consumers = trace_structure(model, shape).consumers
    moments = collect_moments(model, consumers, [torch.randn(1, *shape)], device="cpu")
    return 8 * sum(m.second.numel() + m.position_sum.numel() + 1 for m in moments.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return 0
    rows, scratch = [], Path(os.environ.get("TMPDIR", "/tmp")) / f"distributed-{os.getpid()}.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for case in CASES:
        for processes in (1, 2):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={processes}", __file__, "--worker", case,
                            str(scratch)], check=True, env=env, cwd=ROOT)
            seconds, reduced, images = scratch.read_text().strip().split(",")
            rows.append({"model": case, "processes": processes, "threads_each": 1,
                         "images": int(images), "seconds": float(seconds),
                         "all_reduce_MiB": int(reduced) / 2**20})
    scratch.unlink(missing_ok=True)
    frame = pd.DataFrame(rows)
    one = frame.groupby("model")["seconds"].transform("first")
    frame["efficiency"] = one / (frame["processes"] * frame["seconds"])
    frame.to_csv(ROOT / "docs" / "benchmarks" / "distributed.csv", index=False)
    print(markdown(frame, 3))
    resnet50 = reduce_bytes("resnet50", (3, 224, 224))
    print(f"\nResNet-50 at 224: one all-reduce of every consumer's float64 moments = "
          f"{resnet50 / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
