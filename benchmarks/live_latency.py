"""How live the dashboard is: slider-to-numbers latency and cold page loads (issues 4 and 5).

    python benchmarks/live_latency.py [--model fmnist-resnet] [--positions 20] [--quick]

Three measurements, each in a fresh process so that no cache is warm unless stated:
1. the library path behind the Prune page's slider (plan, apply with refit and BatchNorm
   recalibration, evaluation on the live test subset) over random MACs targets, statistics cached;
2. the Prune page itself rerun by Streamlit's AppTest after each slider move to a stop not seen
   before (everything the page does: the path above plus the kept-channel bars and the download
   files);
3. the first load of the Fidelity and Theory pages from a cold start (model, data, statistics).
Writes docs/benchmarks/live_latency.csv and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _table import markdown

from modhifi.backend import percentile

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")


def _open(model: str, page: str):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(APP, default_timeout=600)
    app.session_state["sidebar.model"] = model
    app.session_state["sidebar.device"] = "cpu"
    return app.switch_page(page).run()  # straight to the page, as a shared link to it opens


def _summary(kind: str, seconds: list[float]) -> dict:
    p95 = percentile(seconds, 0.95)
    return {"measurement": kind, "runs": len(seconds), "median_s": statistics.median(seconds),
            "p95_s": p95, "max_s": max(seconds)}


def library_slider(model: str, positions: int) -> dict:
    from modhifi import bench, zoo
    from modhifi.backend import choose_backend

    backend = choose_backend("cpu")
    subject = zoo.open_subject(model, device=backend.device)
    analysis = bench.live_analysis(subject.loaded.model, subject.dataset, backend=backend)
    result = bench.slider_latency(analysis, subject.dataset, backend=backend, positions=positions)
    return {"measurement": "library slider path", "runs": result.positions,
            "median_s": result.median_s, "p95_s": result.p95_s, "max_s": float("nan")}


def page_slider(model: str, positions: int) -> dict:
    """Every other stop of the slider (0.05 steps up to 0.8) once, in random order: no cache hits."""
    app = _open(model, "pages/prune.py")
    start_value = app.slider(key="prune.target").value
    stops = [s for s in (round(0.05 * i, 2) for i in range(1, 17)) if s != start_value]
    seconds = []
    for value in random.Random(0).sample(stops, min(positions, len(stops))):
        start = time.perf_counter()
        app.slider(key="prune.target").set_value(value).run()
        seconds.append(time.perf_counter() - start)
        assert not app.exception and not app.error, (app.exception, app.error)
    return _summary("Prune page rerun after a slider move (AppTest)", seconds)


def cold_page(model: str, page: str) -> dict:
    start = time.perf_counter()
    app = _open(model, f"pages/{page}.py")
    seconds = time.perf_counter() - start
    assert not app.exception and not app.error, (app.exception, app.error)
    return _summary(f"first load of the {page.title()} page, cold (AppTest)", [seconds])


def _in_fresh_process(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--positions", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 positions, no cold page loads")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.one:
        what, *rest = args.one
        measure = {"library": library_slider, "page": page_slider}.get(what)
        result = (measure(args.model, args.positions) if measure else cold_page(args.model, rest[0]))
        print(json.dumps(result))
        return
    positions = 5 if args.quick else args.positions
    jobs = [("library",), ("page",)] + ([] if args.quick else [("cold", "fidelity"), ("cold", "theory")])
    rows = [_in_fresh_process("--model", args.model, "--positions", str(positions), "--one", *job)
            for job in jobs]
    table = pd.DataFrame(rows)
    import torch

    table.insert(0, "model", args.model)
    table["threads"] = torch.get_num_threads()
    out = ROOT / "docs" / "benchmarks" / "live_latency.csv"
    table.to_csv(out, index=False)
    print(markdown(table))


if __name__ == "__main__":
    main()
