"""ModHiFi-U on a text encoder: forget one category of texts, without gradients or fine-tuning,
then audit it. The classifier is the encoder with the category probe on its embeddings.

Why not the image path's edit: zeroing or negating the (output, neuron) pairs of the FFN
down-projections with the largest contrastive saliency did not forget selectively here (a
category fell to 5% only as the others fell by 25 points, docs/results.md): in a residual
stream that is pooled over tokens, a topic is a direction spread over many neurons, not a few
kernel slices. The statistics are of the same kind (first and second moments of the edited
layer's inputs, on the forget category and on all texts); the edit is one closed-form rank-one
change of the last layer's down-projection.

1. **Statistics** (`topic_statistics`): one pass over the forget category's calibration texts
   and a seeded reference sample of all calibration texts (their labels unread). A text is a
   sample: its mean over real tokens of the down-projection's input a (d_ff) and of the residual
   stream h entering the layer's last LayerNorm (hidden).
2. **Direction** (`topic_direction`): w = (Σ + λ·mean diag Σ)⁻¹ (m_f − m), the discriminant of
   the forget texts' mean activations (mean m_f) against the reference texts' (mean m,
   covariance Σ), scaled so that the score s(a) = wᵀ(a − m) averages 1 over the forget texts;
   d = E_f h̄ − E h̄, the forget texts' offset of the residual stream.
3. **Plan** (`plan_forgetting`): the edit moves every token's residual stream by −α·d·s(a): the
   forget texts' mean by −α·d (α = 1: onto the mean of all texts), texts scored near 0 hardly at
   all. α is the smallest on a grid (refined by bisection) that takes the forget calibration
   texts' category accuracy to ≤ a target, each text edited with a direction fitted on the other
   folds (cross-fitting: the direction recognises the texts it was fitted on better than unseen
   ones). The edit enters just before the last LayerNorm, so each α costs only that LayerNorm,
   the pooling and the probe on the recorded tokens (`TopicStatistics.edited_embeddings`),
   exactly what the edited model computes.
4. **Edit** (`apply_plan`): W ← W − α·d·wᵀ, b ← b + α·d·wᵀm, on a private copy.
5. **Audit** (`audit_text`, with `modhifi.audit`): per-category accuracy on the test split, the
   membership attack on the probe's outputs (the category's train texts, which the probe was
   fitted on, against its test texts), and a probe refitted on the edited calibration embeddings.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.audit import Audit, audit_frame, audit_from, balanced, per_class_frame, summary_keys
from modhifi.audit import probe as refit_probe
from modhifi.errors import UserError
from modhifi.hooks import hooked, private_copy
from modhifi.options import (FOLDS, REFERENCE_TEXTS, TOPIC_RIDGE, TOPIC_SLACK, TOPIC_TARGET,
                             WHY_FORGET_TARGET, check_fraction)
from modhifi.text.corpus import Corpus, TextSplit
from modhifi.text.encoder import TransformerLayer, embed, token_batches, transformer_layers
from modhifi.text.quality import Probe
from modhifi.unlearn.direction import discriminant, weakest_strength
from modhifi.unlearn.scores import reference_index


@dataclass(frozen=True, eq=False)
class TopicStatistics:
    """What one pass over calibration texts gives: each text's mean activations and stream, and
    the forget texts' recorded tokens."""

    layer: TransformerLayer   # the edited layer (the last one)
    activations: Tensor       # (n, d_ff) each text's mean FFN input ā, float64
    streams: Tensor           # (n, hidden) each text's mean stream h̄, float64
    forget: Tensor            # (n,) bool: a text of the forget category
    reference: Tensor         # (n,) bool: in the seeded sample of all texts
    fold: Tensor              # (n,) long: the cross-fitting fold of each text
    tokens: tuple[tuple[Tensor, Tensor, Tensor, Tensor], ...] = field(repr=False)
    # per batch of forget texts: (B,) their rows, (B, T) attention mask, (B, T, d_ff) a,
    # (B, T, hidden) h
    finish: tuple[nn.Module, ...] = field(repr=False)  # the last LayerNorm, pooling, ...
    embeddings: Tensor = field(repr=False)  # (n, hidden) dense sentence embeddings
    texts: tuple[int, ...] = ()             # the calibration index of each row

    @torch.inference_mode()
    def edited_embeddings(self, directions: TopicDirection, strength: float) -> Tensor:
        """(n_forget, hidden) the forget texts' sentence embeddings after the edit, in row order:
        α·d·s(a) subtracted from the stream before the last LayerNorm, as the edited model does.
        `directions`: one direction, or one per fold stacked (each text is then edited with its
        own fold's, as `topic_direction(..., cross_fitted=True)` gives)."""
        norm, *pooling = self.finish
        out, rows = [], []
        for row, mask, a, h in self.tokens:
            fold = self.fold[row] if directions.weight.dim() == 2 else None
            score = directions.score(a, fold)  # (B, T)
            shift = directions.shift if fold is None else directions.shift[fold][:, None]
            stream = h - (strength * score[..., None] * shift.to(h.device)).float()
            features = {"token_embeddings": norm(stream), "attention_mask": mask}
            for module in pooling:
                features = module(features)
            out.append(features["sentence_embedding"].float())
            rows.append(row)
        order = torch.cat(rows).argsort()
        return torch.cat(out)[order.to(out[0].device)]


def topic_statistics(model: nn.Module, calibration: TextSplit, *, category: int,
                     device: torch.device | str, reference_texts: int | None = REFERENCE_TEXTS,
                     folds: int = FOLDS, seed: int = 0, batch_size: int = 64) -> TopicStatistics:
    """One forward pass over the forget category's calibration texts and a seeded sample of all
    calibration texts (labels unread beyond choosing the forget texts).

    Memory: the forget texts' tokens are kept, (d_ff + hidden)·4 bytes each (about 300 MB for
    40,000 tokens of MiniLM).
    """
    labels = torch.tensor(calibration.labels)
    forget = (labels == category).nonzero().squeeze(1)
    if not len(forget):
        raise UserError(f"the calibration texts have no text of category {category}; pick a "
                        "category the corpus has")
    reference = reference_index(len(calibration), reference_texts, seed)
    used = torch.cat([forget, reference]).unique()  # sorted calibration indices
    is_forget = torch.isin(used, forget)
    layer = transformer_layers(model)[-1]
    means: dict[str, Tensor] = {}
    state: dict[str, Tensor] = {}
    kept = []

    def record(key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x, mask = args[0], state["mask"]  # (B, T, d), (B, T)
            mean = (x.double() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, d)
            if key not in means:
                means[key] = mean.new_empty(len(used), mean.shape[1])
            means[key][state["rows"].to(mean.device)] = mean
            state[key] = x
        return hook

    dense = []
    texts = [calibration.texts[i] for i in used.tolist()]
    with torch.inference_mode(), hooked(model, before={layer.ffn_down: record("a"),
                                                       layer.ffn_norm: record("h")}) as run:
        for rows, features in token_batches(run, texts, batch_size=batch_size, device=device):
            state.update(mask=features["attention_mask"], rows=rows)
            dense.append((rows, run(dict(features))["sentence_embedding"].float().cpu()))
            mine = is_forget[rows]  # (B,)
            if mine.any():
                at = mine.to(state["a"].device)
                kept.append((rows[mine], features["attention_mask"][at], state["a"][at].clone(),
                             state["h"][at].clone()))
        finish = (run.get_submodule(layer.ffn_norm), *list(run)[1:])
    embeddings = torch.empty(len(used), dense[0][1].shape[1])
    for rows, vectors in dense:
        embeddings[rows] = vectors
    # Folds: the forget texts dealt out in a seeded order, then the others, so each fold holds
    # its share of both.
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(used), dtype=torch.long)
    for rows in (is_forget.nonzero().squeeze(1), (~is_forget).nonzero().squeeze(1)):
        fold[rows[torch.randperm(len(rows), generator=generator)]] = \
            torch.arange(len(rows)) % folds
    return TopicStatistics(layer, means["a"].cpu(), means["h"].cpu(), is_forget,
                           torch.isin(used, reference), fold, tuple(kept), finish, embeddings,
                           tuple(used.tolist()))


@dataclass(frozen=True, eq=False)
class TopicDirection:
    """The discriminant of the forget texts and the stream offset the edit removes (one, or one
    per cross-fitting fold stacked along a first dimension)."""

    category: int
    layer: str              # the edited down-projection
    weight: Tensor          # ([folds,] d_ff) w, scaled so that E_f wᵀ(ā − m) = 1 (float64)
    centre: Tensor          # ([folds,] d_ff) m, the reference texts' mean activation
    shift: Tensor           # ([folds,] hidden) d = E_f h̄ − E h̄
    spread: Tensor          # ([folds,] d_ff) the standard deviation of each neuron's text mean
    ridge: float

    def score(self, a: Tensor, fold: Tensor | None = None) -> Tensor:
        """s(a) = wᵀ(a − m) of FFN inputs (B, T, d_ff) -> (B, T); with `fold` (B,), each text
        with its fold's direction."""
        w, m = self.weight.to(a.device), self.centre.to(a.device)
        if fold is None:
            return (a.double() - m) @ w
        w, m = w[fold.to(a.device)][:, None], m[fold.to(a.device)][:, None]  # (B, 1, d_ff)
        return ((a.double() - m) * w).sum(-1)

    def neurons(self, count: int = 20) -> pd.DataFrame:
        """The neurons the discriminant leans on most: |w_i|·σ_i, the share of the score's
        spread each one carries."""
        weight = (self.weight * self.spread).abs()
        top = weight.topk(min(count, len(weight)))
        return pd.DataFrame({"neuron": top.indices.tolist(), "weight": top.values.tolist(),
                             "sign": self.weight[top.indices].sign().long().tolist()})


def _direction(statistics: TopicStatistics, rows: Tensor, ridge: float) -> tuple[Tensor, ...]:
    """(w, m, d, σ) from the texts in `rows` (n,) bool (module docstring, step 2)."""
    a, h = statistics.activations, statistics.streams
    forget, reference = rows & statistics.forget, rows & statistics.reference
    w, m, variance = discriminant(a[reference], a[forget].mean(0), ridge)  # (d_ff,) each
    return w, m, h[forget].mean(0) - h[reference].mean(0), variance.clamp(min=0).sqrt()


def topic_direction(statistics: TopicStatistics, *, category: int, ridge: float = TOPIC_RIDGE,
                    cross_fitted: bool = False) -> TopicDirection:
    """The direction from all texts, or (`cross_fitted`) one per fold from the texts of the
    other folds."""
    if cross_fitted:
        parts = [_direction(statistics, statistics.fold != j, ridge)
                 for j in range(int(statistics.fold.max()) + 1)]
        w, m, d, spread = (torch.stack(part) for part in zip(*parts))
    else:
        w, m, d, spread = _direction(statistics, torch.ones_like(statistics.forget), ridge)
    return TopicDirection(category, statistics.layer.ffn_down, w, m, d, spread, ridge)


@dataclass(frozen=True, eq=False)
class TopicPlan:
    """What the edit will change, shown before anything changes."""

    direction: TopicDirection = field(repr=False)
    strength: float                         # α
    calibration_forget_accuracy: float      # at α, each text edited with a direction fitted
    # without it (cross-fitted), on the forget calibration texts
    calibration_retain_agreement: float | None = None  # other texts' predictions unchanged

    @property
    def category(self) -> int:
        return self.direction.category

    def rank_one(self) -> tuple[Tensor, Tensor]:
        """(ΔW (hidden, d_ff), Δb (hidden,)) of the down-projection, float64."""
        d = self.strength * self.direction.shift  # (hidden,)
        return -torch.outer(d, self.direction.weight), d * (self.direction.weight
                                                            @ self.direction.centre)


def plan_forgetting(statistics: TopicStatistics, probe: Probe, *, category: int,
                    target: float = TOPIC_TARGET, ridge: float = TOPIC_RIDGE,
                    strength: float | None = None) -> TopicPlan:
    """The direction, and the smallest strength whose cross-fitted edit takes the forget
    calibration texts' category accuracy to ≤ `target` (each text edited with the direction
    fitted on the other folds, so the strength is chosen on texts the direction has not seen),
    or `strength` when given. Where no grid strength reaches the target, the smallest one within
    `TOPIC_SLACK` of the lowest accuracy any grid strength reaches."""
    check_fraction("target", target, why=WHY_FORGET_TARGET)
    folds = topic_direction(statistics, category=category, ridge=ridge, cross_fitted=True)
    n = int(statistics.forget.sum())
    allowed = math.floor(target * n + 1e-9) / n

    @functools.cache  # the strength search and the plan ask for some strengths twice
    def accuracy(alpha: float) -> float:
        predicted = probe.predict(statistics.edited_embeddings(folds, alpha)).cpu()
        return float((predicted == category).double().mean())

    if strength is None:
        strength = weakest_strength(accuracy, allowed, TOPIC_SLACK)
    return TopicPlan(topic_direction(statistics, category=category, ridge=ridge),
                     float(strength), accuracy(strength))


@torch.no_grad()
def apply_plan(model: nn.Module, plan: TopicPlan) -> nn.Module:
    """A copy of `model` with the rank-one edit written into the down-projection; `model` is
    untouched."""
    edited = private_copy(model)
    down = edited.get_submodule(plan.direction.layer)
    delta_w, delta_b = plan.rank_one()
    down.weight += delta_w.to(down.weight)
    down.bias += delta_b.to(down.bias)
    return edited


@dataclass(frozen=True, eq=False)
class TopicResult:
    """The edited encoder, the plan, and the audit before and after."""

    model: nn.Module
    plan: TopicPlan
    before: Audit
    after: Audit
    seconds: float  # statistics, plan and edit; not the audits
    categories: tuple[str, ...]

    def to_frame(self) -> pd.DataFrame:
        """One row per audit figure: metric, before, after."""
        return audit_frame({"before": self.before, "after": self.after})

    def per_class_frame(self) -> pd.DataFrame:
        """One row per category: class, before, after (test accuracy)."""
        return per_class_frame(self.categories, {"before": self.before, "after": self.after})

    def summary(self, *, model: str, device: str) -> dict:
        """The `unlearn` command's keys for a text model (contract.md), plus the text ones."""
        return {"model": model, "forget_class": self.plan.category,
                "forget_category": self.categories[self.plan.category], "edit": "rank-one",
                "layers": 1, "k": None, "strength": self.plan.strength, "device": device,
                **summary_keys(self.before, self.after), "seconds": self.seconds}


def audit_text(model: nn.Module, probe: Probe, corpus: Corpus, *, category: int,
               device: torch.device | str, seed: int = 0) -> Audit:
    """The image path's audit for an encoder with its category probe (module docstring, 5)."""
    test, train, calibration = corpus.test, corpus.train, corpus.calibration
    test_labels = torch.tensor(test.labels)
    test_embeddings = embed(model, test.texts, device=device)
    train_labels = torch.tensor(train.labels)
    members, _ = balanced((train_labels == category).nonzero().squeeze(1),
                          (test_labels == category).nonzero().squeeze(1), seed)
    members = members.sort().values
    member_embeddings = embed(model, [train.texts[i] for i in members.tolist()], device=device)
    probed = refit_probe(embed(model, calibration.texts, device=device).cpu(),
                   torch.tensor(calibration.labels), test_embeddings.cpu(), test_labels,
                   num_classes=len(corpus.categories))
    return audit_from(probe.logits(test_embeddings).cpu(), test_labels,
                      probe.logits(member_embeddings).cpu(), train_labels[members], probed,
                      forget_class=category, seed=seed)


def forget_category(model: nn.Module, probe: Probe, corpus: Corpus, *, category: int,
                    device: torch.device | str, target: float = TOPIC_TARGET,
                    ridge: float = TOPIC_RIDGE, strength: float | None = None,
                    reference_texts: int | None = REFERENCE_TEXTS, seed: int = 0,
                    before: Audit | None = None) -> TopicResult:
    """Make the encoder forget one category (statistics → direction → plan → edit) and audit it.

    Args:
        model: a sentence-transformers encoder on `device`; not modified.
        probe: the category classifier on its embeddings.
        corpus: calibration texts drive the edit (labels only pick the forget texts), the test
            and train splits the audit.
        category: index of the category to forget.
        target: the highest acceptable category accuracy on the forget calibration texts.
        ridge: λ of the discriminant, relative to the mean variance.
        strength: α, instead of the search.
        reference_texts: calibration texts of all categories behind the means (seeded).
        before: the audit of `model`, when already computed.
    """
    if not 0 <= category < len(corpus.categories):
        last = len(corpus.categories) - 1
        raise UserError(f"category {category!r} is out of range for {corpus.name} "
                        f"({last + 1} categories): pass 0..{last}")
    begin = time.perf_counter()
    statistics = topic_statistics(model, corpus.calibration, category=category, device=device,
                                  reference_texts=reference_texts, seed=seed)
    plan = plan_forgetting(statistics, probe, category=category, target=target, ridge=ridge,
                           strength=strength)
    edited = apply_plan(model, plan)
    # The other texts of the reference sample: how many of their predictions the edit changed.
    others = statistics.reference & ~statistics.forget  # (n,)
    texts = [corpus.calibration.texts[statistics.texts[i]] for i in others.nonzero()[:, 0]]
    agreement = None
    if texts:
        same = (probe.predict(embed(edited, texts, device=device)).cpu()
                == probe.predict(statistics.embeddings[others]).cpu())
        agreement = float(same.double().mean())
    plan = replace(plan, calibration_retain_agreement=agreement)
    seconds = time.perf_counter() - begin
    run = dict(category=category, device=device, seed=seed)
    return TopicResult(edited, plan, before or audit_text(model, probe, corpus, **run),
                       audit_text(edited, probe, corpus, **run), seconds, corpus.categories)
