"""Why a half-MACs model is not twice as fast: per-convolution throughput, and aligned widths.

    python benchmarks/speed_anatomy.py [--model fmnist-resnet] [--target 0.5] [--aligned 16]

1. Every convolution of the dense and of the default half-MACs model (ModHiFi-P, uniform, multiples
   of 8) timed alone on its real input at batch 64 (frozen TorchScript, channels-last, BatchNorm
   folded): milliseconds and GMAC/s per layer (docs/benchmarks/speed_anatomy_<model>.csv), and the
   whole models timed side by side, with and without oneDNN graph fusion (…_whole.csv).
2. `--aligned N`: every allocation whose groups keep multiples of N channels with a MACs reduction
   within 10% above the target's, each compensated and recalibrated, with its test accuracy, and
   the most accurate one timed side by side with the dense and the default model. This reads the
   test split to *analyse* what shapes could do; nothing in the library is chosen from it. Writes
   docs/benchmarks/speed_anatomy_<model>_aligned<N>.csv.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import pandas as pd
import torch
from _table import markdown

from modhifi.backend import choose_backend, time_calls, time_side_by_side
from modhifi.metrics import (
    channels_last,
    evaluate,
    inference_copy,
    optimise_for_inference,
)
from modhifi.prune import Analysis, GroupPlan, PrunePlan, analyse
from modhifi.trace import trace_forward
from modhifi.zoo import open_subject

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64


def per_convolution(name: str, model: torch.nn.Module, example: torch.Tensor, backend) -> list[dict]:
    """Each convolution of the BatchNorm-folded model timed alone: ms and GMAC/s."""
    folded = inference_copy(model, example)
    trace = trace_forward(folded, example)  # each layer's input shape, in call order
    convolutions = [n for n in trace.in_call_order()
                    if isinstance(folded.get_submodule(n), torch.nn.Conv2d)]
    rows = []
    for layer in convolutions:
        conv = folded.get_submodule(layer)
        x = channels_last(torch.randn(example.shape[0], *trace.shapes[layer]))  # (B, c_in, H, W)
        with torch.no_grad():
            out = conv(x)  # (B, c_out, H', W')
            frozen = torch.jit.freeze(torch.jit.trace(conv.eval(), x))
            timing = time_calls(backend, lambda f=frozen, x=x: f(x))
        macs = out.numel() * conv.weight[0].numel()
        rows.append({"model": name, "layer": layer, "c_in": conv.weight.shape[1],
                     "c_out": conv.weight.shape[0], "input_hw": x.shape[-1], "ms": timing.median_ms,
                     "gmacs_per_s": macs / timing.median_ms / 1e6})
    return rows


def whole_models(models, example: torch.Tensor, backend, *, onednn_fusion: bool) -> list[float]:
    """Median ms of each model's optimised form (channels-last), timed side by side."""
    nhwc = channels_last(example)
    torch.jit.enable_onednn_fusion(onednn_fusion)  # global: on only while these are traced
    try:
        calls = [lambda f=optimise_for_inference(m, example): f(nhwc) for m in models]
        with torch.no_grad():
            return [t.median_ms for t in time_side_by_side(backend, calls, warmup=5, repeats=30)]
    finally:
        torch.jit.enable_onednn_fusion(False)


def plan_with(analysis: Analysis, kept: dict[str, int]) -> PrunePlan:
    """The ModHiFi plan that keeps the top `kept[group]` channels of every group."""
    rankings = analysis.ranking("modhifi")
    groups = tuple(GroupPlan(name, len(r.order), tuple(sorted(r.order[:kept[name]])),
                             tuple(sorted(r.order[kept[name]:]))) for name, r in rankings.items())
    macs, params = analysis.structure.cost(kept)
    return PrunePlan("modhifi", 0.0, "macs", "uniform", "all", groups, analysis.structure.macs, macs,
                     analysis.structure.params, params)


def aligned(analysis: Analysis, dataset, *, target: float, step: int) -> pd.DataFrame:
    """Every allocation in multiples of `step` within 10% above the target's MACs reduction."""
    goal = 1 / (1 - target)
    options = {g.name: range(step, g.size + 1, step) for g in analysis.structure.groups}
    rows = []
    for widths in itertools.product(*options.values()):
        kept = dict(zip(options, widths))
        ratio = analysis.structure.macs / analysis.structure.cost(kept)[0]
        if goal <= ratio <= 1.1 * goal:
            pruned = analysis.apply(plan_with(analysis, kept))
            accuracy = evaluate(pruned, dataset.test, device=torch.device("cpu"),
                                num_classes=dataset.num_classes).accuracy
            rows.append({**kept, "macs_ratio": ratio, "accuracy": accuracy})
            print(f"{widths} {ratio:.2f}× {accuracy:.4f}", file=sys.stderr, flush=True)
    if not rows:
        raise SystemExit(f"speed_anatomy: no allocation in multiples of {step} lands within 10% "
                         f"above {goal:.2f}× fewer MACs; try another --target or --aligned")
    return pd.DataFrame(rows).sort_values("accuracy", ascending=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-resnet")
    parser.add_argument("--target", type=float, default=0.5, help="share of the MACs to remove")
    parser.add_argument("--aligned", type=int, help="also enumerate widths in multiples of this")
    args = parser.parse_args()
    backend = choose_backend("cpu")
    subject = open_subject(args.model, device=backend.device)
    model, dataset = subject.loaded.model, subject.dataset
    calibration = dataset.calibration.subset(slice(0, 2000))
    analysis = analyse(model, tuple(calibration.batches(250, device=backend.device)),
                       device=backend.device, input_shape=dataset.input_shape)
    default = analysis.apply(analysis.plan(args.target, target_kind="macs"))
    example = torch.randn(BATCH, *dataset.input_shape)

    table = pd.DataFrame(per_convolution("dense", model, example, backend)
                         + per_convolution("modhifi", default, example, backend))
    out = ROOT / "docs" / "benchmarks" / f"speed_anatomy_{args.model}.csv"
    table.to_csv(out, index=False)
    print(markdown(table, digits=2))
    totals = table.groupby("model", sort=False)["ms"].sum()
    print(f"all convolutions: dense {totals['dense']:.2f} ms, pruned {totals['modhifi']:.2f} ms "
          f"({totals['dense'] / totals['modhifi']:.2f}×; {backend.description}, batch {BATCH})")
    whole = []
    for fusion in (False, True):
        dense_ms, pruned_ms = whole_models((model, default), example, backend, onednn_fusion=fusion)
        whole.append({"form": "frozen TorchScript, channels-last"
                      + (", oneDNN graph fusion" if fusion else ""),
                      "dense_ms": dense_ms, "modhifi_ms": pruned_ms, "speedup": dense_ms / pruned_ms,
                      "convolutions_share_dense": totals["dense"] / dense_ms,
                      "convolutions_share_modhifi": totals["modhifi"] / pruned_ms,
                      "device": backend.description, "batch": BATCH})
    whole = pd.DataFrame(whole)
    whole.to_csv(out.with_name(f"{out.stem}_whole.csv"), index=False)
    print(markdown(whole, digits=2))

    if args.aligned:
        found = aligned(analysis, dataset, target=args.target, step=args.aligned)
        found.to_csv(out.with_name(f"{out.stem}_aligned{args.aligned}.csv"), index=False)
        best = analysis.apply(plan_with(analysis, {g.name: int(found.iloc[0][g.name])
                                                   for g in analysis.structure.groups}))
        dense_ms, default_ms, best_ms = whole_models((model, default, best), example, backend,
                                                     onednn_fusion=False)
        print(f"{len(found)} aligned plans; the most accurate: {found.iloc[0].to_dict()}")
        print(f"side by side at batch {BATCH}: default plan {dense_ms / default_ms:.2f}×, most "
              f"accurate aligned plan {dense_ms / best_ms:.2f}× (dense {dense_ms:.2f} ms)")


if __name__ == "__main__":
    main()
