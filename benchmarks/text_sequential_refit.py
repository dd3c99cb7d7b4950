"""Does a sequential refit close issue 14's margin? MiniLM-L6, FFN neurons, greedy plan.

The library refits every FFN down-projection on the dense model's own statistics (one pass).
Here, layer by layer in forward order, each down-projection is instead fitted by least squares
(free bias, ridge 1e-4 of the mean diagonal, as the library) on the inputs of the model whose
earlier layers are already pruned and refitted, to one of two targets per token:
`output`: the dense layer's output; `residual`: that plus the dense model's residual input minus
the pruned one (BERT adds the FFN output to its attention output before the LayerNorm, so this
target also undoes the drift of the layers before). Same kept neurons as the one-shot refit.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_sequential_refit.py --target 0.3
"""
from __future__ import annotations

import argparse
import time

import torch

from modhifi.backend import choose_backend
from modhifi.hooks import private_copy
from modhifi.text.components import analyse_text
from modhifi.text.encoder import embed, token_batches
from modhifi.text.quality import accuracy, agreement
from modhifi.text.subject import open_text
from modhifi.text.surgery import apply_plan

LAM = 1e-4


def sequential(dense, analysis, plan, texts, *, variant: str, device):
    """A masked copy of `dense` whose down-projections are refitted one layer at a time."""
    model = private_copy(dense)
    for layer, keep in zip(analysis.layers, plan.kept):
        block = layer.ffn_down.rsplit(".", 1)[0]  # BertOutput(hidden_states, input_tensor)
        caught = {}
        hooks = [m.get_submodule(block).register_forward_pre_hook(
            lambda module, args, key=key: caught.__setitem__(key, args[:2]))
            for key, m in (("dense", dense), ("pruned", model))]
        keep = torch.tensor(keep)
        down = dense.get_submodule(layer.ffn_down)
        w, b = down.weight.double(), down.bias.double()  # (c_out, c_in), (c_out,)
        gram = torch.zeros(len(keep) + 1, len(keep) + 1, dtype=torch.float64)
        cross = torch.zeros(w.shape[0], len(keep) + 1, dtype=torch.float64)
        try:
            with torch.inference_mode():
                for _, features in token_batches(dense, texts, device=device):
                    mask = features["attention_mask"].bool()  # (B, T): real tokens
                    dense(dict(features))
                    model(dict(features))
                    x_dense, a_dense = (t[mask].double() for t in caught["dense"])  # (n, ·)
                    x_pruned, a_pruned = (t[mask].double() for t in caught["pruned"])
                    y = x_dense @ w.T + b  # (n, c_out)
                    if variant == "residual":
                        y = y + a_dense - a_pruned
                    z = torch.cat([x_pruned[:, keep], torch.ones(len(y), 1).double()], 1)
                    gram += z.T @ z
                    cross += y.T @ z
        finally:
            for hook in hooks:
                hook.remove()
        ridge = LAM * gram.diagonal()[:-1].mean()
        gram[range(len(keep)), range(len(keep))] += ridge
        solved = torch.linalg.solve(gram, cross.T).T  # (c_out, kept + 1)
        linear = model.get_submodule(layer.ffn_down)
        with torch.no_grad():
            weight = torch.zeros_like(linear.weight)
            weight[:, keep] = solved[:, :-1].to(weight)
            linear.weight.copy_(weight)
            linear.bias.copy_(solved[:, -1].to(weight))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.3, help="share of FFN neurons removed")
    parser.add_argument("--calib-samples", type=int, default=512)
    args = parser.parse_args()
    device = choose_backend("cpu").device
    subject = open_text("minilm-l6", device=device)
    texts, test = subject.corpus.calibration.texts[:args.calib_samples], subject.corpus.test
    reference = embed(subject.model, test.texts, device=device)
    analysis = analyse_text(subject.model, texts, device=device)
    plan = analysis.plan(args.target, kind="ffn", method="modhifi-greedy")
    models = {"one-shot refit (the library)": lambda: apply_plan(analysis, plan)}
    for variant in ("output", "residual"):
        models[f"sequential refit, {variant} target"] = lambda variant=variant: sequential(
            subject.model, analysis, plan, texts, variant=variant, device=device)
    print(f"| refit ({args.target:.0%} of FFN neurons, {len(test)} test quotations) | "
          "mean cosine | category accuracy | seconds |\n|---|---|---|---|")
    for label, make in models.items():
        start = time.perf_counter()
        model = make()
        seconds = time.perf_counter() - start
        vectors = embed(model, test.texts, device=device)
        print(f"| {label} | {agreement(reference, vectors).embedding_cosine:.4f} | "
              f"{accuracy(subject.probe, vectors, test.labels):.4f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
