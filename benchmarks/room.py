"""How many people one server holds: Prune-page slider response with 1, 4 and 8 sessions moving
their sliders at once, and the memory each open model costs (README, "Running it for a room").

    python benchmarks/room.py [--model fmnist-resnet] [--moves 8] [--sessions 1 4 8] [--quick]

Streamlit runs every session in a thread of one process and shares the cached model and its
analysis, so sessions here are threads on one shared `Analysis` (the dashboard's default 1,000
calibration images). Each slider move does what the Prune page computes for a position it has
not seen: plan, apply (refit, surgery, BatchNorm recalibration), evaluation on the live 2,000
test images, and the download's checkpoint bytes; each session moves to its own seeded random
positions, so no move is served from a cache. Response = seconds from the move to its numbers.
Memory: resident set growth of a fresh process after opening each zoo model (model and data),
then after its analysis. Writes docs/benchmarks/room.csv, room_memory.csv and room.png.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from _table import markdown

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"


def slider_moves(analysis, dataset, backend, *, session: int, moves: int,
                 start: threading.Barrier) -> list[float]:
    """Seconds of each of one session's slider moves."""
    from modhifi import bench, metrics, zoo

    live = dataset.test.subset(slice(0, bench.LIVE_TEST_IMAGES))
    positions = random.Random(session).sample([round(0.05 * i, 2) for i in range(2, 16)], moves)
    start.wait()
    seconds = []
    for target in positions:
        begin = time.perf_counter()
        plan = analysis.plan(target, target_kind="macs")
        pruned = analysis.apply(plan, compensation="refit")
        metrics.evaluate(pruned, live, device=backend.device, num_classes=dataset.num_classes)
        zoo.checkpoint_bytes(pruned, removed=plan.removed_channels())
        seconds.append(time.perf_counter() - begin)
    return seconds


def responses(model: str, sessions_list: list[int], moves: int) -> pd.DataFrame:
    from modhifi import bench, zoo
    from modhifi.backend import choose_backend, percentile

    backend = choose_backend("cpu")
    subject = zoo.open_subject(model, device=backend.device)
    dataset = subject.dataset
    analysis = bench.live_analysis(subject.loaded.model, dataset, backend=backend)
    analysis.ranking("modhifi")  # cached once per server, before the first visitor
    slider_moves(analysis, dataset, backend, session=99, moves=2,
                 start=threading.Barrier(1))  # warm-up
    rows = []
    for sessions in sessions_list:
        start = threading.Barrier(sessions)
        begin = time.perf_counter()
        with ThreadPoolExecutor(sessions) as pool:
            per_session = list(pool.map(
                lambda s: slider_moves(analysis, dataset, backend, session=s, moves=moves,
                                       start=start), range(sessions)))
        wall = time.perf_counter() - begin
        seconds = [s for session in per_session for s in session]
        rows.append({"model": model, "sessions": sessions, "moves": len(seconds),
                     "median_s": statistics.median(seconds), "p95_s": percentile(seconds, 0.95),
                     "max_s": max(seconds), "moves_per_s": len(seconds) / wall,
                     "threads": backend.threads, "device": backend.description})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def _resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS"))) / 1024


def memory_of(model: str) -> dict:
    """Resident memory growth of opening one model, then of its analysis, in a process that has
    already opened and analysed digits-cnn (so imports and kernel caches are not counted)."""
    import torch

    from modhifi import bench, zoo
    from modhifi.backend import choose_backend

    def open_and_analyse(name: str) -> tuple[float, float, object]:
        subject = zoo.open_subject(name, device=torch.device("cpu"))
        opened = _resident_mib()
        analysis = bench.live_analysis(subject.loaded.model, subject.dataset,
                                       backend=choose_backend("cpu"))
        return opened, _resident_mib(), (subject, analysis)

    warm = open_and_analyse("digits-cnn")  # noqa: F841 - kept alive, as on a server
    base = _resident_mib()
    opened, analysed, kept = open_and_analyse(model)
    return {"model": model, "model_and_data_mib": opened - base,
            "analysis_mib": analysed - opened, "total_mib": analysed - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--moves", type=int, default=8, help="slider moves per session")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--quick", action="store_true", help="digits-cnn, 2 moves, 1 and 4 sessions")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one fresh process
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of)))
        return
    if args.quick:
        args.model, args.moves, args.sessions = "digits-cnn", 2, [1, 4]
    table = responses(args.model, args.sessions, args.moves)
    from modhifi.zoo import ZOO

    names = [args.model] if args.quick else list(ZOO)
    memory = pd.DataFrame([json.loads(subprocess.run(
        [sys.executable, __file__, "--memory-of", name], capture_output=True, text=True,
        cwd=ROOT, check=True).stdout.splitlines()[-1]) for name in names])
    suffix = "_quick" if args.quick else ""
    table.to_csv(OUT / f"room{suffix}.csv", index=False)
    memory.to_csv(OUT / f"room_memory{suffix}.csv", index=False)
    _plot(table, OUT / f"room{suffix}.png")
    print(markdown(table.drop(columns=["device"])))
    print()
    print(markdown(memory, digits=1))


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.plot(table.sessions, table.median_s, "o-", label="median")
    axis.plot(table.sessions, table.p95_s, "s--", label="p95")
    axis.set(xlabel="sessions moving their sliders at once", ylabel="seconds per slider move",
             title=f"{table.model[0]}, {table.device[0]}", xticks=list(table.sessions))
    axis.set_ylim(bottom=0)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
