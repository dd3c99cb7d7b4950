"""The Prune page's architecture view as a table: for one zoo model and plan, each layer's kept
share, the output energy its kept inputs still reproduce, the accuracy when only the group it
writes is pruned as in the plan, and its share of the measured forward time next to its share of
the MACs (issue 15).

    python benchmarks/layers.py [--model fmnist-resnet] [--target 0.5] [--kind macs]

Same library calls as the page: 1,000 calibration images, default options (ModHiFi, refit,
BatchNorm recalibration), accuracy on the first 2,000 test images, time of an eager forward of a
random batch of 64 on this machine's CPU (median of 15 after 3 warm-up). Writes
docs/benchmarks/layers_<model>.csv and prints a Markdown table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _table import markdown

from modhifi import bench, metrics
from modhifi.backend import choose_backend
from modhifi.prune.architecture import architecture, only_group
from modhifi.zoo import open_subject

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--kind", default="macs", choices=("macs", "channels"))
    args = parser.parse_args()
    backend = choose_backend("cpu")
    subject = open_subject(args.model, device=backend.device)
    data = subject.dataset
    analysis = bench.live_analysis(subject.loaded.model, data, backend=backend)
    plan = analysis.plan(args.target, target_kind=args.kind)
    live = data.test.subset(slice(0, bench.LIVE_TEST_IMAGES))

    def accuracy(model) -> float:
        return metrics.evaluate(model, live, device=backend.device,
                                num_classes=data.num_classes).accuracy

    dense, whole = accuracy(analysis.model), accuracy(analysis.apply(plan))
    alone = {g.name: accuracy(analysis.apply(only_group(analysis, plan, g.name)))
             for g in plan.groups if g.removed}
    timed = metrics.measure_layer_latency(analysis.model, data.input_shape, backend=backend)
    ms = dict(timed.per_layer)
    nodes = architecture(analysis, plan).nodes
    table = nodes.assign(
        alone=nodes["writes"].map(alone), ms=nodes["layer"].map(ms),
        macs_share=nodes["macs"] / nodes["macs"].sum(),
        time_share=nodes["layer"].map(ms) / sum(ms.values()))
    out = ROOT / "docs" / "benchmarks" / f"layers_{args.model}.csv"
    table.to_csv(out, index=False)
    print(f"{args.model}: remove {args.target} of the {args.kind}; dense {dense:.2%}, "
          f"pruned {whole:.2%} on {len(live):,} test images; {backend.description}; forward "
          f"{timed.forward_ms:.1f} ms (batch {timed.batch_size}, median of {timed.repeats})")
    shown = table[["name", "shape", "kept", "fidelity", "alone", "macs_share", "time_share"]]
    print(markdown(shown.rename(columns={
        "kept": "channels kept", "fidelity": "output energy kept",
        "alone": "accuracy, only its group pruned", "macs_share": "share of MACs",
        "time_share": "share of layer time"})))


if __name__ == "__main__":
    main()
