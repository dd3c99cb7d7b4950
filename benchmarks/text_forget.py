"""MiniLM-L6 on fortunes: forget one category at a time, no gradients, no fine-tuning (issue 14).

For every category: `forget_category` (statistics on the calibration quotations, the gate's
cross-fitted threshold and strength, the spare neuron of the last FFN made the gate), then the
audit on the 1,271 test quotations: the category's accuracy before and after, the other categories' mean
change, the membership attack, the refitted probe; the calibration figures the plan was chosen
by; seconds for statistics, plan and edit (the audits not counted).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_forget.py           # ~2 min on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_forget.py --quick   # computers only

Writes docs/benchmarks/text_forget_minilm-l6.csv and .md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import pandas as pd
import torch
from _table import markdown

from modhifi.backend import choose_backend
from modhifi.options import REFERENCE_TEXTS, TOPIC_RIDGE, TOPIC_TARGET
from modhifi.text.forget import audit_inputs, audit_text, forget_category
from modhifi.text.subject import open_text

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--ridge", type=float, default=TOPIC_RIDGE)
    parser.add_argument("--target", type=float, default=TOPIC_TARGET)
    parser.add_argument("--reference-texts", type=int, default=REFERENCE_TEXTS)
    parser.add_argument("--categories", help="comma-separated indices (default: all)")
    parser.add_argument("--quick", action="store_true", help="one category (computers)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    backend = choose_backend("auto")
    subject = open_text(args.model, device=backend.device)
    names = subject.corpus.categories
    chosen = ([names.index("computers")] if args.quick else range(len(names))
              if args.categories is None else [int(c) for c in args.categories.split(",")])
    rows = []
    recorded = audit_inputs(subject.model, subject.corpus, device=backend.device)  # as the page
    for category in chosen:
        before = audit_text(subject.model, subject.probe, subject.corpus, category=category,
                            device=backend.device, test_embeddings=recorded.test.embeddings,
                            calibration_embeddings=recorded.calibration.embeddings)
        result = forget_category(subject.model, subject.probe, subject.corpus,
                                 category=category, device=backend.device, target=args.target,
                                 ridge=args.ridge, reference_texts=args.reference_texts,
                                 before=before, recorded=recorded)
        after = result.after
        others = [a - b for c, (a, b) in enumerate(zip(after.per_class, before.per_class))
                  if c != category]
        rows.append({"category": names[category], "neuron": result.plan.neuron,
                     "quantile": result.plan.gate.quantile, "strength": result.plan.strength,
                     "calibration_forget": result.plan.calibration_forget_accuracy,
                     "calibration_retain_agreement": result.plan.calibration_retain_agreement,
                     "forget_before": before.forget_accuracy,
                     "forget_after": after.forget_accuracy,
                     "others_change": sum(others) / len(others),
                     "others_worst": min(others),
                     "mia_before": before.mia_auc, "mia_after": after.mia_auc,
                     "probe_before": before.probe_forget_accuracy,
                     "probe_after": after.probe_forget_accuracy,
                     "seconds": result.seconds})
        print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"text_forget_{args.model}"
    frame.to_csv(stem.with_suffix(".csv"), index=False)
    command = "OMP_NUM_THREADS={} .venv/bin/python benchmarks/text_forget.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), shlex.join(sys.argv[1:]))
    stem.with_suffix(".md").write_text(
        f"# Forgetting a category of {args.model} ({backend.description}, "
        f"{torch.get_num_threads()} threads)\n\n`{command}`\n\n" + markdown(frame) + "\n")
    print(markdown(frame))


if __name__ == "__main__":
    main()
