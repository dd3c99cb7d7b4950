"""How close a modified text encoder stays to the dense one, on the same test texts.

- Embedding cosine: each text's embedding against the dense model's (mean and 5th percentile).
- Retrieval agreement: the share of texts whose nearest other test text is the dense model's;
  recall@10: the share whose dense nearest neighbour is among the modified model's 10 nearest.
- Category accuracy: a linear probe trained on the dense model's embeddings of the train split
  predicts each test text's fortunes category (`Probe`).
- Throughput: sentences per second at batch 64, models timed side by side (`backend`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from modhifi.backend import Backend, time_side_by_side
from modhifi.errors import UserError
from modhifi.text.encoder import ENCODE_BATCH, token_batches

RECALL_AT = 10
PROBE_FORMAT = "modhifi-probe/1"


@dataclass(frozen=True, eq=False)
class Probe:
    """A linear classifier of the categories on top of the embeddings (logistic regression)."""

    categories: tuple[str, ...]
    weight: Tensor  # (classes, d)
    bias: Tensor    # (classes,)

    def logits(self, embeddings: Tensor) -> Tensor:
        """(n, classes) from (n, d) embeddings."""
        device = embeddings.device
        return embeddings.float() @ self.weight.T.to(device) + self.bias.to(device)

    def predict(self, embeddings: Tensor) -> Tensor:
        return self.logits(embeddings).argmax(1)

    def save(self, path: Path) -> None:
        from modhifi.zoo import write_atomically

        state = {"format": PROBE_FORMAT, "categories": list(self.categories),
                 "weight": self.weight.cpu(), "bias": self.bias.cpu()}
        write_atomically(Path(path), lambda p: torch.save(state, p))

    @classmethod
    def load(cls, path: Path) -> Probe:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != PROBE_FORMAT:
            raise UserError(f"{path} is not a probe written by modhifi; delete it to retrain")
        return cls(tuple(state["categories"]), state["weight"], state["bias"])


def train_probe(embeddings: Tensor, labels: Sequence[int], categories: Sequence[str]) -> Probe:
    """Multinomial logistic regression (scikit-learn) on dense embeddings, seeded."""
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(max_iter=2000, C=10.0, random_state=0)
    fitted.fit(embeddings.double().cpu().numpy(), list(labels))
    return Probe(tuple(categories), torch.tensor(fitted.coef_, dtype=torch.float32),
                 torch.tensor(fitted.intercept_, dtype=torch.float32))


def accuracy(probe: Probe, embeddings: Tensor, labels: Sequence[int]) -> float:
    return float((probe.predict(embeddings).cpu() == torch.tensor(labels)).double().mean())


def per_category_accuracy(probe: Probe, embeddings: Tensor,
                          labels: Sequence[int]) -> dict[str, float]:
    predicted, truth = probe.predict(embeddings).cpu(), torch.tensor(labels)
    return {name: float((predicted[truth == c] == c).double().mean())
            for c, name in enumerate(probe.categories) if (truth == c).any()}


def nearest(embeddings: Tensor, k: int) -> Tensor:
    """(n, k) the k most cosine-similar other texts of each text, nearest first."""
    unit = nn.functional.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)
    return similarity.topk(min(k, len(unit) - 1), dim=1).indices


@dataclass(frozen=True)
class Agreement:
    """The modified model's embeddings against the dense model's, on the same texts."""

    embedding_cosine: float      # mean
    embedding_cosine_p5: float   # 5th percentile
    retrieval_agreement: float   # same nearest neighbour
    recall_at_10: float          # dense nearest neighbour among the modified model's 10 nearest


def agreement(dense: Tensor, modified: Tensor) -> Agreement:
    """Compare (n, d) embeddings of the same texts; n ≥ 2."""
    if len(dense) < 2 or dense.shape != modified.shape:
        raise UserError("compare at least two texts' embeddings of the same shape")
    cosine = nn.functional.cosine_similarity(dense.double(), modified.double(), dim=1)
    truth = nearest(dense, 1)[:, 0]
    found = nearest(modified, RECALL_AT)
    return Agreement(float(cosine.mean()), float(torch.quantile(cosine, 0.05)),
                     float((found[:, 0] == truth).double().mean()),
                     float((found == truth[:, None]).any(1).double().mean()))


def search(query: Tensor, embeddings: Tensor, k: int = 5) -> tuple[list[int], list[float]]:
    """The `k` rows of (n, d) `embeddings` most cosine-similar to the (d,) `query`, nearest first,
    and their similarities."""
    similarity = nn.functional.normalize(embeddings.double(), dim=1) @ \
        nn.functional.normalize(query.double(), dim=0)
    top = similarity.topk(min(k, len(similarity)))
    return top.indices.tolist(), top.values.tolist()


def sentences_per_second(models: Sequence[nn.Module], texts: Sequence[str], *, backend: Backend,
                         batch_size: int = ENCODE_BATCH, batches: int = 2, warmup: int = 1,
                         repeats: int = 5) -> list[float]:
    """Encoding throughput of each model on the same `batches` × `batch_size` texts (the first
    ones; batched by length as `embed` does), timed side by side in alternation. Tokenizing is
    done once, outside the timing: it is the same for every model."""
    sample = list(texts[:batches * batch_size])
    if not sample:
        raise UserError("no texts to time; pass at least one")
    work = [features for _, features in token_batches(models[0], sample, batch_size=batch_size,
                                                       device=backend.device)]

    def encoder(model: nn.Module):
        def run() -> None:
            with torch.inference_mode():
                for features in work:
                    model(dict(features))
        return run

    timings = time_side_by_side(backend, [encoder(m) for m in models], warmup=warmup,
                                repeats=repeats)
    return [len(sample) / (t.median_ms / 1e3) for t in timings]
