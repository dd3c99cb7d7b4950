"""Could a linear bypass close issue 14's margin? MiniLM-L6, 30% of the FFN neurons, greedy plan.

The refit fits each down-projection's output on the kept neurons' activations h_K. Here it may
also read the FFN's input x (the attention block's output, 384 features) through a linear map L
of rank r, fitted jointly by least squares on the same calibration tokens (free bias, ridge 1e-4
of the mean diagonal, as the library):

    y ≈ A h_K + L x + c        (y = W h + b, the dense layer's output)

A rank-r bypass costs what r neurons cost (one neuron with a large bias is linear: GELU(z) = z
for z ≫ 0), so at rank r the plan keeps r neurons fewer (the last the greedy added). Rank 384
(`free`) keeps every planned neuron and adds a full-rank L: an upper bound on any linear
compensation from x, not a plan of the same size. Written as a masked forward of the dense
model's own modules, not as surgery.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/text_bypass.py
"""
from __future__ import annotations

import types

import torch

from modhifi.backend import choose_backend
from modhifi.hooks import hooked, private_copy
from modhifi.text.components import analyse_text
from modhifi.text.encoder import embed, token_batches
from modhifi.text.quality import accuracy, agreement
from modhifi.text.subject import open_text

RANKS = (0, 16, 64, 384)
LAM = 1e-4


def joint_moments(model, texts, blocks):
    """block -> (second moment sum, sum, tokens) of z = [h; x] over real tokens, float64."""
    sums, mask = {}, {}

    def record(name):
        def hook(module, args):
            z = torch.cat(args[:2], -1)[mask["real"]].double()  # (tokens, n + d)
            part = (z.T @ z, z.sum(0), len(z))
            sums[name] = tuple(map(sum, zip(sums[name], part))) if name in sums else part
        return hook

    with torch.inference_mode(), hooked(model, before={b: record(b) for b in blocks}) as run:
        for _, features in token_batches(run, texts, batch_size=64, device="cpu"):
            mask["real"] = features["attention_mask"].bool()
            run(dict(features))
    return sums


def fit(moments, linear, keep: list[int], rank: int):
    """(A, L or None, c): y ≈ A h_K + L x + c in least squares, L of rank ≤ `rank`."""
    second, total, tokens = moments
    mean = total / tokens
    cov = second / tokens - torch.outer(mean, mean)               # (n + d, n + d)
    weight, bias = linear.weight.double(), linear.bias.double()  # (d, n), (d,)
    n, d = weight.shape[1], weight.shape[0]
    K, X = torch.tensor(keep), torch.arange(n, n + d)
    read = torch.cat([K, X]) if rank else K
    gram = cov[read][:, read]
    ridge = LAM * gram.diagonal().mean() * torch.eye(len(read), dtype=cov.dtype)
    cross = cov[read][:, :n] @ weight.T                           # (|read|, d)
    solved = torch.linalg.solve(gram + ridge, cross)
    A, L = solved[:len(K)].T, solved[len(K):].T if rank else None
    if 0 < rank < d:  # best rank-r L in the metric of Cov(x), then A refitted with L fixed
        values, vectors = torch.linalg.eigh(cov[X][:, X])
        root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
        u, s, vt = torch.linalg.svd(L @ root)
        L = (u[:, :rank] * s[:rank]) @ vt[:rank] @ torch.linalg.pinv(root)
        rest = cross[:len(K)] - cov[K][:, X] @ L.T
        A = torch.linalg.solve(gram[:len(K), :len(K)] + ridge[:len(K), :len(K)], rest).T
    c = weight @ mean[:n] + bias - A @ mean[K] - (L @ mean[X] if rank else 0)
    return A, L, c


def bypassed(model, blocks, fitted):
    """A copy of `model` whose FFN outputs are A h_K + L x + c (BertOutput(h, x) rewritten)."""
    copy = private_copy(model)
    for name, (keep, A, L, c) in zip(blocks, fitted):
        def forward(self, h, x, K=torch.tensor(keep), A=A.float(), c=c.float(),
                    L=None if L is None else L.float()):
            y = h[..., K] @ A.T + c + (0 if L is None else x @ L.T)
            return self.LayerNorm(y + x)
        module = copy.get_submodule(name)
        module.forward = types.MethodType(forward, module)
    return copy


def main() -> None:
    backend = choose_backend("cpu")
    subject = open_text("minilm-l6", device=backend.device)
    test, calibration = subject.corpus.test, subject.corpus.calibration.texts[:512]
    dense = embed(subject.model, test.texts, device="cpu")
    analysis = analyse_text(subject.model, calibration, device="cpu")
    blocks = [layer.ffn_down.rsplit(".", 1)[0] for layer in analysis.layers]  # BertOutput(h, x)
    moments = joint_moments(subject.model, calibration, blocks)
    plan = analysis.plan(0.3, kind="ffn", method="modhifi-greedy")
    greedy = analysis.ranking("ffn", "modhifi-greedy")
    print("| rank of L | neurons kept per layer | mean cosine | p5 cosine | category accuracy |")
    print("|---|---|---|---|---|")
    for rank in RANKS:
        fitted = []
        for layer, name, keep in zip(analysis.layers, blocks, plan.kept):
            spent = rank if rank < 384 else 0
            kept = sorted(int(i) for i in greedy[f"ffn.{layer.index}"].order[:len(keep) - spent])
            linear = subject.model.get_submodule(layer.ffn_down)
            fitted.append((kept, *fit(moments[name], linear, kept, rank)))
        after = embed(bypassed(subject.model, blocks, fitted), test.texts, device="cpu")
        close = agreement(dense, after)
        label = "384 (free)" if rank == 384 else str(rank)
        print(f"| {label} | {len(fitted[0][0])} + {rank} | {close.embedding_cosine:.4f} | "
              f"{close.embedding_cosine_p5:.4f} | "
              f"{accuracy(subject.probe, after, test.labels):.4f} |", flush=True)


if __name__ == "__main__":
    main()
