"""MiniLM-L6 on fortunes: embedding quality against sparsity, no fine-tuning (issue 14).

One `analyse_text` on 512 calibration quotations, then per target and component kind (FFN
neurons, attention heads) a uniform plan per method, applied and compared with the dense model on
the 1,271 test quotations: mean and 5th-percentile embedding cosine, nearest-neighbour agreement,
recall@10 and the category probe's accuracy. ModHiFi-P rows use refit compensation; the
baselines come without one, as published: the L1/L2 norm of each component's consumer columns,
activation RMS, random, and Torch-Pruning's own group importances (`tp.importance`, magnitude L1
and L2 over each neuron's whole group — up-projection row, bias and down-projection column — and
for heads summed over the head's coupled query/key/value/output features), at the same kept
counts. One ablation row: activation ranking with our refit.

A second table times encoding (batch 64, 4 batches of test quotations, dense and pruned side by
side in alternation) against the MACs ratio.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_quality.py            # ~15 min on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_quality.py --quick    # 2 targets, 3 methods

Writes docs/benchmarks/text_quality_minilm-l6.csv (after every row), .png and .md, and
docs/benchmarks/text_speed_minilm-l6.csv.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import pandas as pd
import torch
import torch_pruning as tp
from _table import markdown
from matplotlib.figure import Figure

from modhifi.backend import choose_backend
from modhifi.text.components import TextPlan, block, magnitude_ranking, producers
from modhifi.text.encoder import bert_of, embed, token_batches
from modhifi.text.quality import accuracy, agreement, sentences_per_second
from modhifi.text.subject import open_text
from modhifi.text.surgery import apply_plan

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
TARGETS = {"ffn": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), "heads": (1 / 6, 1 / 3, 0.5)}
# label -> (method of the analysis or a baseline below, compensation)
ROWS = {"modhifi-greedy": ("modhifi-greedy", "refit"), "modhifi": ("modhifi", "refit"),
        "activation+refit (ablation)": ("activation", "refit"),
        "l1": ("l1", "none"), "l2": ("l2", "none"), "activation": ("activation", "none"),
        "random": ("random", "none"), "tp-magnitude-l1": ("tp-magnitude-l1", "none"),
        "tp-magnitude-l2": ("tp-magnitude-l2", "none")}
QUICK_ROWS = ("modhifi-greedy", "activation", "tp-magnitude-l2")


def tp_orders(analysis, kind: str, p: int) -> list[list[int]]:
    """Each layer's components by Torch-Pruning's GroupMagnitudeImportance, best first."""
    bert = bert_of(analysis.model)
    _, features = next(token_batches(analysis.model, ["an example"], device="cpu"))
    example = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    graph = tp.DependencyGraph().build_dependency(bert, example_inputs=example)
    importance = tp.importance.GroupMagnitudeImportance(p=p)
    orders = []
    for layer in analysis.layers:
        maker = analysis.model.get_submodule(producers(layer, kind)[0])
        group = graph.get_pruning_group(maker, tp.prune_linear_out_channels,
                                        idxs=list(range(maker.out_features)))
        scores = importance(group).double().view(-1, block(layer, kind)).sum(1)  # per component
        orders.append(scores.argsort(descending=True).tolist())
    return orders


def baseline_plan(reference: TextPlan, orders: list[list[int]], method: str) -> TextPlan:
    """The reference plan's kept counts, filled from another ranking."""
    kept = tuple(tuple(sorted(order[:len(keep)])) for order, keep in zip(orders, reference.kept))
    return TextPlan(reference.kind, method, reference.target, reference.target_kind,
                    reference.sizes, kept, reference.macs_before, reference.macs_after)


def orders_of(analysis, kind: str, method: str) -> list[list[int]] | None:
    if method.startswith("tp-magnitude"):
        return tp_orders(analysis, kind, p=int(method[-1]))
    if method == "l2":
        from modhifi.prune.importance import Evidence

        evidence = Evidence(analysis.model, analysis.fidelity)
        return [list(magnitude_ranking(g, evidence, p=2).order) for g in analysis.groups(kind)]
    return None  # one of the analysis' own methods


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 FFN targets, 1 head target, 3 rows")
    parser.add_argument("--calib-samples", type=int, default=512)
    args = parser.parse_args()
    matplotlib.use("Agg")
    backend = choose_backend("cpu")
    subject = open_text("minilm-l6", device=backend.device)
    corpus, test = subject.corpus, subject.corpus.test
    dense = embed(subject.model, test.texts, device=backend.device)
    from modhifi.text.components import analyse_text

    start = time.perf_counter()
    analysis = analyse_text(subject.model, corpus.calibration.texts[:args.calib_samples],
                            device=backend.device)
    print(f"analysis: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    targets = {"ffn": (0.3, 0.5), "heads": (1 / 3,)} if args.quick else TARGETS
    labels = QUICK_ROWS if args.quick else tuple(ROWS)
    rows, cache = [], {}
    csv = OUT / "text_quality_minilm-l6.csv"
    accuracy_dense = accuracy(subject.probe, dense, test.labels)
    for kind, values in targets.items():
        for target in values:
            reference = analysis.plan(target, kind=kind, method="modhifi-greedy")
            for label in labels:
                method, compensation = ROWS[label]
                if (kind, method) not in cache:
                    cache[kind, method] = orders_of(analysis, kind, method)
                orders = cache[kind, method]
                plan = (baseline_plan(reference, orders, method) if orders is not None
                        else analysis.plan(target, kind=kind, method=method))
                pruned = apply_plan(analysis, plan, compensation=compensation)
                after = embed(pruned, test.texts, device=backend.device)
                close = agreement(dense, after)
                rows.append({"components": kind, "target": round(target, 4), "method": label,
                             "compensation": compensation,
                             "removed": 1 - plan.units_after / plan.units_before,
                             "macs_ratio": plan.macs_after / plan.macs_before,
                             "embedding_cosine": close.embedding_cosine,
                             "embedding_cosine_p5": close.embedding_cosine_p5,
                             "retrieval_agreement": close.retrieval_agreement,
                             "recall_at_10": close.recall_at_10,
                             "accuracy_before": accuracy_dense,
                             "accuracy_after": accuracy(subject.probe, after, test.labels)})
                print(rows[-1], file=sys.stderr, flush=True)
                pd.DataFrame(rows).to_csv(csv, index=False)
    frame = pd.DataFrame(rows)
    speed = []
    for target in (0.3, 0.5):
        plan = analysis.plan(target, kind="ffn", method="modhifi-greedy")
        pruned = apply_plan(analysis, plan)
        before, after = sentences_per_second([subject.model, pruned], test.texts, backend=backend,
                                             batches=4, warmup=2, repeats=10)
        speed.append({"components": "ffn", "target": target, "batch_size": 64, "texts": 256,
                      "repeats": 10, "warmup": 2, "threads": torch.get_num_threads(),
                      "sentences_per_second_before": before, "sentences_per_second_after": after,
                      "speedup_measured": after / before,
                      "speedup_macs": plan.macs_before / plan.macs_after,
                      "share_of_macs_speedup": (after / before) / (plan.macs_before / plan.macs_after)})
        print(speed[-1], file=sys.stderr, flush=True)
    pd.DataFrame(speed).to_csv(OUT / "text_speed_minilm-l6.csv", index=False)
    figure = Figure(figsize=(11, 4.2))
    for axis, kind in zip(figure.subplots(1, 2), ("ffn", "heads")):
        part = frame[frame["components"] == kind]
        for label, rows_of in part.groupby("method", sort=False):
            axis.plot(rows_of["removed"], rows_of["embedding_cosine"], marker="o",
                      linewidth=2.5 if label.startswith("modhifi") else 1.2, label=label)
        axis.set_xlabel(f"share of {'FFN neurons' if kind == 'ffn' else 'attention heads'} removed")
        axis.set_ylabel("mean embedding cosine to dense")
        axis.set_title(f"MiniLM-L6, fortunes test ({len(test)} quotations): {kind}")
        axis.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(OUT / "text_quality_minilm-l6.png", dpi=110)
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " " + " ".join(
        ["benchmarks/text_quality.py", *map(shlex.quote, sys.argv[1:])])
    table = frame[["components", "target", "method", "compensation", "embedding_cosine",
                   "embedding_cosine_p5", "retrieval_agreement", "recall_at_10", "accuracy_after"]]
    (OUT / "text_quality_minilm-l6.md").write_text(
        f"# MiniLM-L6 on fortunes: quality against sparsity\n\n`{command}` on "
        f"{backend.description}; {args.calib_samples} calibration quotations; dense category "
        f"accuracy {accuracy_dense:.4f}.\n\n" + markdown(table, 4) + "\n\n"
        + markdown(pd.DataFrame(speed), 3) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
