"""Does the greedy's selection objective close issue 14's margin? MiniLM-L6, FFN neurons.

The library's greedy keeps the neurons whose down-projection output, on the dense model's
per-token statistics, is reconstructed best (uncentred second moment), and the refit then fits a
free bias. Here the same greedy runs on three other objectives, each then refitted as the library
refits (same analysis, same refit, same uniform 30% / 50% plan):

- `centred`: the covariance instead of the second moment (the error the refit with a free bias
  is left with: the mean of what is removed goes into the bias anyway);
- `LayerNorm-weighted`: the output error as the layer's LayerNorm sees it, γ ⊙ (e − mean(e))
  (the LayerNorm after the residual sum drops the feature mean and scales by γ);
- both.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_selection.py
"""
from __future__ import annotations

import dataclasses

from modhifi.backend import choose_backend
from modhifi.fidelity import LayerFidelity
from modhifi.text.components import TextAnalysis, analyse_text
from modhifi.text.encoder import embed
from modhifi.text.quality import accuracy, agreement
from modhifi.text.subject import open_text
from modhifi.text.surgery import apply_plan

OBJECTIVES = {"second moment (the library)": None, "centred": (True, False),
              "LayerNorm-weighted": (False, True), "centred + LayerNorm-weighted": (True, True)}


def selected_on(analysis: TextAnalysis, centred: bool, layer_norm: bool) -> TextAnalysis:
    """`analysis` whose FFN fidelities (what the greedy reads) use another objective."""
    fidelity = dict(analysis.fidelity)
    for layer in analysis.layers:
        weight = analysis.model.get_submodule(layer.ffn_down).weight.detach().double()  # (384, n)
        if layer_norm:
            gamma = analysis.model.get_submodule(layer.ffn_norm).weight.detach().double()
            weight = gamma[:, None] * (weight - weight.mean(0))  # e -> γ ⊙ (e − mean(e))
        fidelity[layer.ffn_down] = LayerFidelity.from_moments(
            weight.float()[:, :, None], analysis.moments[layer.ffn_down], centered=centred,
            lam=analysis.fidelity[layer.ffn_down].lam)
    return dataclasses.replace(analysis, fidelity=fidelity)


def main() -> None:
    backend = choose_backend("cpu")
    subject = open_text("minilm-l6", device=backend.device)
    test = subject.corpus.test
    dense = embed(subject.model, test.texts, device=backend.device)
    analysis = analyse_text(subject.model, subject.corpus.calibration.texts[:512],
                            device=backend.device)
    print("| objective | FFN removed | mean cosine | p5 cosine | category accuracy |")
    print("|---|---|---|---|---|")
    for label, variant in OBJECTIVES.items():
        chooser = analysis if variant is None else selected_on(analysis, *variant)
        for target in (0.3, 0.5):
            plan = chooser.plan(target, kind="ffn", method="modhifi-greedy")
            after = embed(apply_plan(analysis, plan), test.texts, device=backend.device)
            close = agreement(dense, after)
            print(f"| {label} | {target:.0%} | {close.embedding_cosine:.4f} | "
                  f"{close.embedding_cosine_p5:.4f} | "
                  f"{accuracy(subject.probe, after, test.labels):.4f} |", flush=True)


if __name__ == "__main__":
    main()
