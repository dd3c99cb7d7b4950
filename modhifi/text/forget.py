"""ModHiFi-U on a text encoder: forget one category of texts, without gradients or fine-tuning,
then audit it. The classifier is the encoder with the category probe on its embeddings.

Why not the image path's edit: zeroing or negating the (output, neuron) pairs of the FFN
down-projections with the largest contrastive saliency did not forget selectively here (a
category fell to 5% only as the others fell by 25 points, docs/results.md): in a residual
stream that is pooled over tokens, a topic is a direction spread over many neurons, not a few
kernel slices. Nor a linear edit along that direction (a rank-one change of the down-projection,
the first version): it moves every text in proportion to its score, so texts of other
categories that score a little pay too (5 of 8 categories cost the others 6-13 points). The edit
here is one FFN neuron of the last layer turned into a gate that fires only on the category's
tokens: the class-direction edit of the image Transformers (`unlearn.direction`), whose `Gate`,
discriminant, spare neuron and threshold choice it shares, with texts for images.

1. **Statistics** (`topic_statistics`): the forget category's calibration texts and a seeded
   reference sample of all calibration texts (their labels unread), from the last FFN's inputs
   recorded on the whole calibration split (`audit_inputs`, which the audit reads too). A text
   is a sample: its mean over real tokens of the last layer's FFN input x (hidden), FFN activation
   a (d_ff) and residual stream h entering the last LayerNorm (hidden); every token's x and h
   are kept for the replay. The spare neuron j is the one whose replacement by its mean changes
   the stream least on the reference tokens: ‖W_{:j}‖²·Var(a_j).
2. **Gate** (`topic_gates`): v = (Σ + λ·mean diag Σ)⁻¹ (m_f − m), the discriminant of the forget
   texts' mean FFN input (mean m_f) against the reference texts' (mean m, covariance Σ), scaled
   so that s(x) = vᵀ(x − m) averages 1 over the forget texts; τ the q-quantile and σ the
   standard deviation of s over the reference texts' tokens; g(x) = φ(κ(s(x) − τ)/σ)·σ/κ with φ
   the layer's own activation (κ = `GATE_SHARPNESS`), about max(s − τ, 0): zero on the tokens
   the category does not reach; d = E_f h̄ − E h̄, the forget texts' offset of the stream.
3. **Plan** (`plan_forgetting`): the edit moves every token's stream by −α·d·g(x) (and by what
   neuron j gave up). For each quantile q of `GATE_QUANTILES`, α is the smallest strength that
   takes the forget calibration texts' category accuracy to the target (`weakest_strength`);
   the plan keeps the q whose edit leaves most other texts' predictions unchanged among those
   within `GATE_SLACK` of the lowest forget accuracy. Both figures are cross-fitted: each text
   is edited with a gate fitted on the other folds (a gate recognises the texts it was fitted on
   better than unseen ones). The edit enters just before the last LayerNorm, so each (q, α)
   costs only that LayerNorm, the pooling and the probe on the recorded tokens
   (`TopicStatistics.edited_embeddings`), exactly what the edited model computes.
4. **Edit** (`apply_plan`), on a private copy: neuron j's up-projection row and bias become
   κ·v/σ and −κ(vᵀm + τ)/σ, its down-projection column −α·d·σ/κ, and the down-projection's bias
   takes W_{:j}·E a_j, what the neuron gave on average.
5. **Audit** (`audit_text`, with `modhifi.audit`): per-category accuracy on the test split, the
   membership attack on the probe's outputs (the category's train texts, which the probe was
   fitted on, against its test texts), and a probe refitted on the edited calibration embeddings.
   The edit changes only the last FFN, so the edited encoder's embeddings of the test and
   calibration splits come from that FFN's inputs recorded on the dense one (`audit_inputs`,
   `encoder.embed_from`): only the member texts take a full pass.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.audit import Audit, audit_frame, audit_from, balanced, per_class_frame, summary_keys
from modhifi.audit import probe as refit_probe
from modhifi.errors import UserError
from modhifi.hooks import private_copy
from modhifi.options import (FOLDS, GATE_QUANTILES, GATE_SLACK, REFERENCE_TEXTS, TOPIC_RIDGE,
                             TOPIC_SLACK, TOPIC_TARGET, WHY_FORGET_TARGET, check_fraction)
from modhifi.text.corpus import Corpus, TextSplit
from modhifi.text.encoder import (LastFfnInputs, TransformerLayer, embed, embed_from, pooled,
                                  last_ffn, record_last_ffn, transformer_layers)
from modhifi.text.quality import Probe
from modhifi.unlearn.direction import (Gate, discriminant, moved_bias, search_gate,
                                       spare_neuron)
from modhifi.unlearn.scores import reference_index


@dataclass(frozen=True, eq=False)
class TopicStatistics:
    """What the last FFN gives on calibration texts: each text's mean FFN input, activation and
    stream, every token's FFN input and stream, and the spare neuron."""

    layer: TransformerLayer   # the edited layer (the last one)
    inputs: Tensor            # (n, hidden) each text's mean FFN input x̄, float64
    activations: Tensor       # (n, d_ff) each text's mean FFN activation ā
    streams: Tensor           # (n, hidden) each text's mean stream h̄
    forget: Tensor            # (n,) bool: a text of the forget category
    reference: Tensor         # (n,) bool: in the seeded sample of all texts
    fold: Tensor              # (n,) long: the cross-fitting fold of each text
    spare: int                # j, the neuron the gate replaces
    spare_mean: float         # E a_j over the reference tokens
    tokens: tuple[tuple[Tensor, Tensor, Tensor, Tensor], ...] = field(repr=False)
    # per batch: (B,) rows, (B, T) attention mask, (B, T, hidden) x, (B, T, hidden) h
    finish: tuple[nn.Module, ...] = field(repr=False)
    # the FFN's up-projection and activation, its down-projection, the last LayerNorm, pooling, …
    embeddings: Tensor = field(repr=False)  # (n, hidden) dense sentence embeddings
    texts: tuple[int, ...] = ()             # the calibration index of each row

    def token_inputs(self, rows: Tensor) -> Tensor:
        """(tokens, hidden) the FFN inputs of the real tokens of the texts in `rows` (n,) bool."""
        return torch.cat([_real(x, mask, rows[row]) for row, mask, x, _ in self.tokens])

    def edited_embeddings(self, gate: Gate, strength: float, rows: Tensor) -> Tensor:
        """(k, hidden) the sentence embeddings of the texts in `rows` (n,) bool, in row order,
        after the edit (`replay`)."""
        return self.replay(gate, rows)(strength)

    @torch.inference_mode()
    def replay(self, gate: Gate, rows: Tensor) -> Callable[[float], Tensor]:
        """α -> (k, hidden) the sentence embeddings of the texts in `rows` (n,) bool, in row
        order, after the edit at strength α: h − W_{:j}(a_j − E a_j) − α·d·g(x) before the last
        LayerNorm, as the edited model computes. `gate`: one, or one per fold stacked (each text
        is then edited with its own fold's, as `topic_gates(..., cross_fitted=True)` gives).
        What does not depend on α is computed once here."""
        up, activation, down, norm, *pooling = self.finish
        j = self.spare
        parts = []  # per batch: (B,) rows, (B, T) mask, (B, T, hidden) base and moved streams
        for row, mask, x, h in self.tokens:
            chosen = rows[row]
            if chosen.any():
                at = chosen.to(x.device)
                x, h, mask = x[at], h[at], mask[at]
                fold = self.fold[row[chosen]] if gate.reading.dim() == 2 else None
                shift = gate.shift if fold is None else gate.shift[fold][:, None]
                given = activation(x @ up.weight[j] + up.bias[j]) - self.spare_mean  # (B, T)
                parts.append((row[chosen], mask, h - given[..., None] * down.weight[:, j],
                              gate.gate(x, activation, fold)[..., None] * shift.to(h)))
        order = torch.cat([part[0] for part in parts]).argsort()

        @torch.inference_mode()
        def embeddings(strength: float) -> Tensor:
            out = [pooled(pooling, norm(base - strength * moved), mask)
                   for _, mask, base, moved in parts]
            return torch.cat(out)[order.to(out[0].device)]
        return embeddings


def _per_text(recorded: LastFfnInputs) -> dict[int, Tensor]:
    """Each recorded text's last-FFN inputs (tokens, hidden), by its index."""
    out = {}
    for index, mask, x in recorded.batches:
        out.update(zip(index.tolist(), x.split(mask.sum(1).tolist())))
    return out


def _real(x: Tensor, mask: Tensor, chosen: Tensor) -> Tensor:
    """(tokens, d) the real (unpadded) tokens of the texts `chosen` (B,) bool of a batch x
    (B, T, d) with attention mask (B, T)."""
    return x[chosen.to(x.device)][mask[chosen.to(mask.device)].bool()]


def topic_statistics(model: nn.Module, calibration: TextSplit, *, category: int,
                     device: torch.device | str, reference_texts: int | None = REFERENCE_TEXTS,
                     folds: int = FOLDS, seed: int = 0, batch_size: int = 64,
                     recorded: LastFfnInputs | None = None) -> TopicStatistics:
    """The forget category's calibration texts and a seeded sample of all calibration texts
    (labels unread beyond choosing the forget texts), from the last FFN's inputs: `recorded`
    over the whole calibration split (`audit_inputs`), else one pass over those texts.

    Memory: every text's tokens are kept, 2·hidden·4 bytes each (about 90 MB for MiniLM's 28,000
    tokens of 512 reference quotations and the *computers* ones).
    """
    labels = torch.tensor(calibration.labels)
    forget = (labels == category).nonzero().squeeze(1)
    if not len(forget):
        raise UserError(f"the calibration texts have no text of category {category}; pick a "
                        "category the corpus has")
    reference = reference_index(len(calibration), reference_texts, seed)
    used = torch.cat([forget, reference]).unique()  # sorted calibration indices
    is_forget, is_reference = torch.isin(used, forget), torch.isin(used, reference)
    if recorded is None:  # the texts it reads, in the order of `used`
        recorded = record_last_ffn(model, [calibration.texts[i] for i in used.tolist()],
                                   device=device, batch_size=batch_size)
        source = torch.arange(len(used))
    else:
        source = used
    tokens = _per_text(recorded)  # recorded index -> (tokens, hidden)
    finish = last_ffn(model) + tuple(model)[1:]  # then pooling, normalisation
    up, activation, down = finish[:3]
    means = {key: torch.empty(len(used), width, dtype=torch.float64) for key, width in (
        ("x", up.in_features), ("a", down.in_features), ("h", down.out_features))}
    moments = torch.zeros(3, down.in_features, dtype=torch.float64,
                          device=recorded.embeddings.device)  # count, Σ a, Σ a² (reference)
    kept = []  # per batch: (B,) rows, (B, T) mask, (B, T, hidden) x and h
    # the batches `token_batches` makes of the texts used (by length), whatever was recorded
    order = sorted(range(len(used)), key=lambda i: len(calibration.texts[int(used[i])]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = torch.tensor(order[start:start + batch_size])
            x = nn.utils.rnn.pad_sequence([tokens[int(source[i])] for i in rows],
                                          batch_first=True)  # (B, T, hidden), padding 0
            lengths = torch.tensor([len(tokens[int(source[i])]) for i in rows])
            mask = (torch.arange(x.shape[1]) < lengths[:, None]).to(x.device, torch.long)
            a = activation(up(x))  # (B, T, d_ff)
            h = down(a) + x        # the stream entering the last LayerNorm (BertOutput)
            for key, value in (("x", x), ("a", a), ("h", h)):
                summed = (value.double() * mask[..., None]).sum(1)
                means[key][rows] = (summed / mask.sum(1, keepdim=True)).cpu()  # (B, width)
            real = _real(a, mask, is_reference[rows]).double()  # (tokens, d_ff)
            moments[0] += len(real)
            moments[1] += real.sum(0)
            moments[2] += (real * real).sum(0)
            kept.append((rows, mask, x, h))
    spare, spare_mean = spare_neuron(moments, down.weight)
    # Folds: the forget texts dealt out in a seeded order, then the others, so each fold holds
    # its share of both.
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(used), dtype=torch.long)
    for rows in (is_forget.nonzero().squeeze(1), (~is_forget).nonzero().squeeze(1)):
        fold[rows[torch.randperm(len(rows), generator=generator)]] = \
            torch.arange(len(rows)) % folds
    return TopicStatistics(transformer_layers(model)[-1], means["x"], means["a"], means["h"],
                           is_forget, is_reference, fold, spare, spare_mean, tuple(kept), finish,
                           recorded.embeddings[source.to(recorded.embeddings.device)].cpu(),
                           tuple(used.tolist()))


def _gates(statistics: TopicStatistics, rows: Tensor, quantiles: tuple[float, ...],
           ridge: float) -> tuple[Tensor, ...]:
    """(v, m, τ (len(quantiles),), σ, d) from the texts in `rows` (n,) bool (module docstring,
    step 2)."""
    x, h = statistics.inputs, statistics.streams
    forget, reference = rows & statistics.forget, rows & statistics.reference
    v, m, _ = discriminant(x[reference], x[forget].mean(0), ridge)  # (hidden,) each
    scores = (statistics.token_inputs(reference).double().cpu() - m) @ v  # (tokens,)
    return (v, m, scores.quantile(torch.tensor(quantiles, dtype=scores.dtype)), scores.std(),
            h[forget].mean(0) - h[reference].mean(0))


def topic_gates(statistics: TopicStatistics, *, quantiles: tuple[float, ...],
                ridge: float = TOPIC_RIDGE, cross_fitted: bool = False) -> tuple[Gate, ...]:
    """One gate per quantile from all texts, or (`cross_fitted`) one per fold (stacked) from
    the texts of the other folds."""
    if cross_fitted:
        parts = [_gates(statistics, statistics.fold != j, quantiles, ridge)
                 for j in range(int(statistics.fold.max()) + 1)]
        v, m, tau, sigma, d = (torch.stack(part) for part in zip(*parts))  # τ: (folds, q)
        tau = tau.T
    else:
        v, m, tau, sigma, d = _gates(statistics, torch.ones_like(statistics.forget), quantiles,
                                     ridge)
    return tuple(Gate(q, v, m, tau[i], sigma, d) for i, q in enumerate(quantiles))


@dataclass(frozen=True, eq=False)
class TopicPlan:
    """What the edit will change, shown before anything changes."""

    category: int
    gate: Gate = field(repr=False)
    layer: TransformerLayer                 # the edited layer
    neuron: int                             # j, the spare neuron turned into the gate
    neuron_mean: float                      # E a_j, moved into the down-projection's bias
    strength: float                         # α
    calibration_forget_accuracy: float      # at α, each text edited with a gate fitted
    # without it (cross-fitted), on the forget calibration texts
    calibration_retain_agreement: float | None = None  # the reference sample's other texts'
    # predictions unchanged (cross-fitted)

    contrast: Tensor | None = field(default=None, repr=False)  # (d_ff,) `contrast`

    def neurons(self, count: int = 20) -> pd.DataFrame:
        """The FFN neurons of the edited layer that tell the category apart most (`contrast`)."""
        top = self.contrast.abs().topk(min(count, len(self.contrast)))
        return pd.DataFrame({"neuron": top.indices.tolist(),
                             "contrast": self.contrast[top.indices].tolist()})


def plan_for(statistics: TopicStatistics, category: int, gate: Gate, strength: float,
             forget_accuracy: float, retain_agreement: float | None = None) -> TopicPlan:
    """A plan of `gate` at `strength` on the statistics' layer and spare neuron."""
    return TopicPlan(category, gate, statistics.layer, statistics.spare, statistics.spare_mean,
                     float(strength), forget_accuracy, retain_agreement, contrast(statistics))


def plan_forgetting(statistics: TopicStatistics, probe: Probe, *, category: int,
                    target: float = TOPIC_TARGET, ridge: float = TOPIC_RIDGE,
                    quantile: float | None = None, strength: float | None = None) -> TopicPlan:
    """The gate and strength (module docstring, step 3), or the `quantile` and `strength` when
    given. The plan's figures are the cross-fitted ones of its (q, α)."""
    check_fraction("target", target, why=WHY_FORGET_TARGET)
    n = int(statistics.forget.sum())
    allowed = math.floor(target * n + 1e-9) / n
    others = statistics.reference & ~statistics.forget  # (n,)
    dense = probe.predict(statistics.embeddings[others]).cpu()
    quantiles = GATE_QUANTILES if quantile is None else (quantile,)

    def accuracy(folds: Gate) -> Callable[[float], float]:
        replay = statistics.replay(folds, statistics.forget)  # once per gate, for every α
        return lambda alpha: float((probe.predict(replay(alpha)).cpu() == category)
                                   .double().mean())

    def kept(folds: Gate, alpha: float) -> float:
        edited = statistics.edited_embeddings(folds, alpha, others)
        return float((probe.predict(edited).cpu() == dense).double().mean())

    choice = search_gate(topic_gates(statistics, quantiles=quantiles, ridge=ridge,
                                     cross_fitted=True), accuracy,
                         kept if others.any() else None, target=allowed,
                         strength_slack=TOPIC_SLACK, threshold_slack=GATE_SLACK,
                         strength=strength)
    gate, = topic_gates(statistics, quantiles=(choice.gate.quantile,), ridge=ridge)
    return plan_for(statistics, category, gate, choice.strength, choice.forget_accuracy,
                    choice.kept)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: TopicPlan) -> nn.Module:
    """A copy of `model` whose spare neuron is the plan's gate (module docstring, step 4);
    `model` is untouched. `plan.gate` is one gate, not a fold stack."""
    edited = private_copy(model)
    down = edited.get_submodule(plan.layer.ffn_down)
    j = plan.neuron
    plan.gate.write(edited.get_submodule(plan.layer.ffn_up), down, neuron=j,
                    strength=plan.strength, bias=moved_bias(down, j, plan.neuron_mean))
    return edited


def contrast(statistics: TopicStatistics) -> Tensor:
    """(d_ff,) how much more the forget texts activate each FFN neuron of the edited layer than
    the reference texts, in the reference's standard deviations of a text's mean activation."""
    a = statistics.activations
    reference = a[statistics.reference]
    return (a[statistics.forget].mean(0) - reference.mean(0)) / reference.std(0).clamp(min=1e-12)


@dataclass(frozen=True, eq=False)
class TopicResult:
    """The edited encoder, the plan, and the audit before and after."""

    model: nn.Module
    plan: TopicPlan
    before: Audit
    after: Audit
    seconds: float  # statistics, plan and edit; not the audits
    categories: tuple[str, ...]
    test_embeddings: Tensor = field(repr=False)  # (n_test, hidden) the edited model's, in order

    def to_frame(self) -> pd.DataFrame:
        """One row per audit figure: metric, before, after."""
        return audit_frame({"before": self.before, "after": self.after})

    def per_class_frame(self) -> pd.DataFrame:
        """One row per category: class, before, after (test accuracy)."""
        return per_class_frame(self.categories, {"before": self.before, "after": self.after})

    def summary(self, *, model: str, device: str) -> dict:
        """The `unlearn` command's keys for a text model (contract.md), plus the text ones."""
        return {"model": model, "forget_class": self.plan.category,
                "forget_category": self.categories[self.plan.category], "edit": "gate",
                "layers": 1, "k": None, "strength": self.plan.strength,
                "gate_neuron": self.plan.neuron, "gate_quantile": self.plan.gate.quantile,
                "device": device,
                **summary_keys(self.before, self.after), "seconds": self.seconds}


@dataclass(frozen=True, eq=False)
class AuditInputs:
    """The test and calibration splits recorded once on the dense encoder (`LastFfnInputs`):
    with them, auditing the dense encoder and any edit of its last FFN passes anew only over the
    category's member texts (about 160 of the 2,700 texts an audit reads on fortunes)."""

    test: LastFfnInputs
    calibration: LastFfnInputs


def audit_inputs(model: nn.Module, corpus: Corpus, *,
                 device: torch.device | str) -> AuditInputs:
    """One pass over the test and one over the calibration split (hidden·4 bytes a token: about
    160 MB for MiniLM on fortunes)."""
    return AuditInputs(*(record_last_ffn(model, split.texts, device=device)
                         for split in (corpus.test, corpus.calibration)))


def audit_text(model: nn.Module, probe: Probe, corpus: Corpus, *, category: int,
               device: torch.device | str, seed: int = 0, test_embeddings: Tensor | None = None,
               calibration_embeddings: Tensor | None = None) -> Audit:
    """The image path's audit for an encoder with its category probe (module docstring, 5);
    `test_embeddings`, `calibration_embeddings`: the model's embeddings of those splits, when
    already made."""
    test, train, calibration = corpus.test, corpus.train, corpus.calibration
    test_labels = torch.tensor(test.labels)
    if test_embeddings is None:
        test_embeddings = embed(model, test.texts, device=device)
    if calibration_embeddings is None:
        calibration_embeddings = embed(model, calibration.texts, device=device)
    train_labels = torch.tensor(train.labels)
    members, _ = balanced((train_labels == category).nonzero().squeeze(1),
                          (test_labels == category).nonzero().squeeze(1), seed)
    members = members.sort().values
    member_embeddings = embed(model, [train.texts[i] for i in members.tolist()], device=device)
    probed = refit_probe(calibration_embeddings.cpu(), torch.tensor(calibration.labels),
                         test_embeddings.cpu(), test_labels, num_classes=len(corpus.categories))
    return audit_from(probe.logits(test_embeddings).cpu(), test_labels,
                      probe.logits(member_embeddings).cpu(), train_labels[members], probed,
                      forget_class=category, seed=seed)


def forget_category(model: nn.Module, probe: Probe, corpus: Corpus, *, category: int,
                    device: torch.device | str, target: float = TOPIC_TARGET,
                    ridge: float = TOPIC_RIDGE, quantile: float | None = None,
                    strength: float | None = None,
                    reference_texts: int | None = REFERENCE_TEXTS, seed: int = 0,
                    before: Audit | None = None,
                    recorded: AuditInputs | None = None) -> TopicResult:
    """Make the encoder forget one category (statistics → gate → plan → edit) and audit it.

    Args:
        model: a sentence-transformers encoder on `device`; not modified.
        probe: the category classifier on its embeddings.
        corpus: calibration texts drive the edit (labels only pick the forget texts), the test
            and train splits the audit.
        category: index of the category to forget.
        target: the highest acceptable category accuracy on the forget calibration texts.
        ridge: λ of the discriminant, relative to the mean variance.
        quantile: q, the gate's threshold, instead of the search over `GATE_QUANTILES`.
        strength: α, instead of the search.
        reference_texts: calibration texts of all categories behind the means (seeded).
        before: the audit of `model`, when already computed.
        recorded: `audit_inputs(model, corpus)`, when already made (else made here): the edited
            encoder differs from `model` only in the last FFN, so its audit replays that FFN.
    """
    if not 0 <= category < len(corpus.categories):
        last = len(corpus.categories) - 1
        raise UserError(f"category {category!r} is out of range for {corpus.name} "
                        f"({last + 1} categories): pass 0..{last}")
    if recorded is None:
        recorded = audit_inputs(model, corpus, device=device)
    elif (len(recorded.test.embeddings), len(recorded.calibration.embeddings)) != (
            len(corpus.test), len(corpus.calibration)):
        raise ValueError("`recorded` holds other texts than this corpus's test and calibration "
                         "splits: pass audit_inputs(model, corpus)")
    begin = time.perf_counter()
    statistics = topic_statistics(model, corpus.calibration, category=category, device=device,
                                  reference_texts=reference_texts, seed=seed,
                                  recorded=recorded.calibration)
    plan = plan_forgetting(statistics, probe, category=category, target=target, ridge=ridge,
                           quantile=quantile, strength=strength)
    edited = apply_plan(model, plan)
    seconds = time.perf_counter() - begin
    run = dict(category=category, device=device, seed=seed)
    if before is None:
        before = audit_text(model, probe, corpus, test_embeddings=recorded.test.embeddings,
                            calibration_embeddings=recorded.calibration.embeddings, **run)
    test_embeddings = embed_from(edited, recorded.test)  # the audit's, kept
    after = audit_text(edited, probe, corpus, test_embeddings=test_embeddings,
                       calibration_embeddings=embed_from(edited, recorded.calibration), **run)
    return TopicResult(edited, plan, before, after, seconds, corpus.categories, test_embeddings)
