"""ModHiFi-P's evidence on a text encoder: its two kinds of components, their per-token input
statistics and fidelities, rankings, and plans (score → plan; `surgery` applies a plan).

- FFN neurons (`ffn`): input feature i of a layer's down-projection, made by row i of its
  up-projection (method.md §1: "for a Transformer FFN, one hidden neuron").
- Attention heads (`heads`): head h is the block of `head_size` input features of the attention
  output projection, made by the head's query, key and value rows. The consumer's
  `LayerFidelity` sees the output projection's weight as (c_out, heads, head_size), exactly as it
  sees a k×k kernel as (c_out, c_in, k²): singleton and subset fidelity, greedy selection and the
  refit then act on whole heads, never half of one.

Statistics are sums over real tokens: the padding of each batch is masked out, so a token is a
sample and H = E_token[x xᵀ].
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity
from modhifi.hooks import hooked, private_copy
from modhifi.moments import LayerMoments, moments_of
from modhifi.options import (COMPONENT_LABELS, DEFAULT_METHOD, FLOOR, ROUND_TO, WHY_FLOOR, WHY_ROUND_TO,
                             Component, Method, TargetKind, check, check_fraction, check_target,
                             check_whole)
from modhifi.prune.importance import IMPORTANCES, Evidence, Ranking, ranking_of
from modhifi.prune.plan import TARGET_UNITS, check_costs, kept_counts, least_knob, most
from modhifi.prune.structure import ChannelGroup
from modhifi.text.encoder import TransformerLayer, token_batches, transformer_layers
from modhifi.text.latency import TextCosts


def consumer(layer: TransformerLayer, kind: Component) -> str:
    """The layer that reads the components: the down-projection or the attention output."""
    return layer.ffn_down if kind == "ffn" else layer.attention_out


def producers(layer: TransformerLayer, kind: Component) -> tuple[str, ...]:
    """The layers whose output rows make the components."""
    return (layer.ffn_up,) if kind == "ffn" else (layer.query, layer.key, layer.value)


def block(layer: TransformerLayer, kind: Component) -> int:
    """Input features per component: 1 for a neuron, head_size for a head."""
    return 1 if kind == "ffn" else layer.head_size


def target_units(kind: Component, target_kind: TargetKind) -> str:
    """What a target is a share of: the components of `kind`, the MACs or the latency."""
    return COMPONENT_LABELS[kind] if target_kind == "channels" else TARGET_UNITS[target_kind]


def component_group(model: nn.Module, layer: TransformerLayer, kind: Component) -> ChannelGroup:
    """The components of one kind in one layer, as a channel group of the shared importances."""
    size = model.get_submodule(consumer(layer, kind)).in_features // block(layer, kind)
    return ChannelGroup(name=f"{kind}.{layer.index}", size=size, producers=producers(layer, kind),
                        consumers=((consumer(layer, kind), tuple(range(size))),), norms=())


def token_moments(model: nn.Module, texts: Sequence[str], layers: Sequence[str], *,
                  device: torch.device | str, batch_size: int = 64) -> dict[str, LayerMoments]:
    """Per-token input statistics of `layers` (module names), padding masked out.

    Returns:
        name -> LayerMoments whose samples are tokens (one position each).
    """
    moments: dict[str, LayerMoments] = {}
    tokens: dict[str, torch.Tensor] = {}  # the running batch's (B, T) mask of real tokens

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0][tokens["mask"]]  # (B, T, c_in) -> (real tokens, c_in)
            part = moments_of(module, x).float64()  # batches add up in float64, as images' do
            moments[name] = moments[name] + part if name in moments else part
        return hook

    with torch.inference_mode(), hooked(model, before={n: record(n) for n in layers}) as run:
        for _, features in token_batches(run, texts, batch_size=batch_size, device=device):
            tokens["mask"] = features["attention_mask"].bool()
            run(dict(features))
    return moments


def magnitude_ranking(group: ChannelGroup, evidence: Evidence, p: int = 1) -> Ranking:
    """Baseline: the Lp norm of each component's columns in its consumer (the down-projection's
    column of a neuron, the output projection's column block of a head)."""
    (name, _), = group.consumers
    weight = evidence.model.get_submodule(name).weight.detach().double().cpu()  # (c_out, c_in)
    norm = weight.abs().pow(p).sum(0).view(group.size, -1).sum(1).pow(1 / p)
    order = norm.argsort(descending=True)
    return ranking_of(order, norm[order])


# The shared importances; the magnitude baseline reads the consumer's columns (a producer's rows
# would mix a head's query, key and value).
TEXT_IMPORTANCES = {**IMPORTANCES, "l1": magnitude_ranking}


@dataclass(frozen=True)
class TextPlan:
    """Which components of one kind each layer keeps: a plain value, shown before anything
    changes."""

    kind: Component
    method: str
    target: float
    target_kind: TargetKind
    sizes: tuple[int, ...]             # components per layer before
    kept: tuple[tuple[int, ...], ...]  # kept components per layer, sorted
    macs_before: float                 # per sentence, at the calibration texts' token lengths
    macs_after: float
    # Milliseconds per timed pass a cost model predicts (`text.latency`): None without one.
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None

    @property
    def speedup_planned(self) -> float | None:
        """The speed-up the cost model predicts (None without one)."""
        if self.latency_before_ms is None:
            return None
        return self.latency_before_ms / self.latency_after_ms

    @property
    def units_before(self) -> int:
        return sum(self.sizes)

    @property
    def units_after(self) -> int:
        return sum(map(len, self.kept))

    def removed(self) -> dict[int, list[int]]:
        """layer index -> removed components."""
        return {i: sorted(set(range(n)) - set(keep))
                for i, (n, keep) in enumerate(zip(self.sizes, self.kept))}

    def to_frame(self) -> pd.DataFrame:
        kept = [len(k) for k in self.kept]
        return pd.DataFrame({"layer": range(len(self.sizes)), "components": self.sizes,
                             "kept": kept, "removed": [n - k for n, k in zip(self.sizes, kept)]})


@dataclass(frozen=True)
class TokenCost:
    """MACs per sentence as a function of the kept components (linear layers and attention)."""

    hidden: int
    mean_tokens: float          # E[T] over the texts
    mean_square_tokens: float   # E[T²]: attention scores and their product with V grow with it

    def unit_macs(self, layer: TransformerLayer, kind: Component) -> float:
        """MACs per sentence that one component costs."""
        if kind == "ffn":  # one up row and one down column per token
            return 2 * self.hidden * self.mean_tokens
        size = layer.head_size  # q, k, v rows and the output block; Q Kᵀ and A V
        return 4 * self.hidden * size * self.mean_tokens + 2 * size * self.mean_square_tokens


@dataclass(frozen=True)
class TextAnalysis:
    """Statistics and fidelities of one text encoder's components, computed once; plans come
    from it (`plan`) and pruned copies are made from it (`modhifi.text.surgery.apply_plan`)."""

    model: nn.Module = field(repr=False)   # the analysis' own eval-mode copy, never modified
    layers: tuple[TransformerLayer, ...]
    moments: dict[str, LayerMoments] = field(repr=False)  # consumer -> per-token statistics
    fidelity: dict[str, LayerFidelity] = field(repr=False)
    cost: TokenCost
    macs: float                # dense MACs per sentence at the calibration lengths
    texts: int
    seconds: float
    _rankings: dict[tuple[str, str, int], dict[str, Ranking]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def groups(self, kind: Component) -> tuple[ChannelGroup, ...]:
        return tuple(component_group(self.model, layer, check(Component, kind))
                     for layer in self.layers)

    def kept_by_consumer(self, plan: TextPlan) -> dict[str, tuple[int, ...]]:
        """consumer layer -> the components it keeps under `plan`."""
        return {consumer(layer, plan.kind): keep for layer, keep in zip(self.layers, plan.kept)}

    def score_map(self, kind: Component) -> pd.DataFrame:
        """One row per (layer, component): its best singleton fidelity over the consumer's
        outputs, its mean share of their energy (saliency / E‖Y_c‖²), and its keep priority
        under greedy selection (0 = kept first)."""
        greedy = self.ranking(kind, "modhifi-greedy")
        frames = []
        for layer, group in zip(self.layers, self.groups(kind)):
            fidelity = self.fidelity[consumer(layer, kind)]
            share = fidelity.saliency / fidelity.energy.clamp(min=1e-30)[:, None]
            priority = torch.empty(group.size, dtype=torch.long)
            priority[list(greedy[group.name].order)] = torch.arange(group.size)
            frames.append(pd.DataFrame({
                "layer": layer.index, "component": range(group.size),
                "singleton": fidelity.singleton.max(0).values.cpu().numpy(),
                "saliency_share": share.mean(0).cpu().numpy(), "priority": priority.numpy()}))
        return pd.concat(frames, ignore_index=True)

    def ranking(self, kind: Component, method: Method, *, seed: int = 0) -> dict[str, Ranking]:
        """group name -> its components in keep order (computed once per kind, method, seed)."""
        importance = TEXT_IMPORTANCES[check(Method, method)]
        with self._lock:
            key = (kind, method, seed)
            if key not in self._rankings:
                evidence = Evidence(self.model, self.fidelity, seed)
                self._rankings[key] = {g.name: importance(g, evidence) for g in self.groups(kind)}
            return dict(self._rankings[key])

    def _counts(self, kind: Component, method: Method, target_kind: TargetKind, floor: float,
                round_to: int | None, seed: int,
                costs: TextCosts | None) -> tuple[Callable[[float], dict[str, int]],
                                                  Callable[[float], float], dict[str, Ranking]]:
        """(knob -> kept components per layer, knob -> share removed, the rankings)."""
        check(TargetKind, target_kind)
        check_costs(target_kind, costs)
        check_fraction("floor", floor, why=WHY_FLOOR)
        round_to = (ROUND_TO if kind == "ffn" else 1) if round_to is None else round_to
        check_whole("--round-to", round_to, WHY_ROUND_TO)
        rankings = self.ranking(kind, method, seed=seed)
        groups = self.groups(kind)
        total = sum(g.size for g in groups)

        def kept(knob: float) -> dict[str, int]:
            return kept_counts(rankings, knob, "uniform", floor, round_to)

        def removed(knob: float) -> float:
            counts = kept(knob)
            if target_kind == "channels":
                return 1 - sum(counts.values()) / total
            if target_kind == "latency":
                return 1 - costs.predict(kind, list(counts.values())) / costs.dense_ms
            return self.saved_macs(kind, counts) / self.macs
        return kept, removed, rankings

    def saved_macs(self, kind: Component, kept: dict[str, int]) -> int:
        """MACs per sentence that keeping `kept` components per layer saves."""
        return sum(self.cost.unit_macs(layer, kind) * (group.size - kept[group.name])
                   for layer, group in zip(self.layers, self.groups(kind)))

    def most(self, *, kind: Component = "ffn", target_kind: TargetKind = "channels",
             method: Method = DEFAULT_METHOD, floor: float = FLOOR, round_to: int | None = None,
             seed: int = 0, costs: TextCosts | None = None) -> float:
        """The largest target a plan with these options can reach."""
        return most(self._counts(kind, method, target_kind, floor, round_to, seed, costs)[1],
                    monotone=target_kind != "latency")

    def plan(self, target: float, *, kind: Component = "ffn", target_kind: TargetKind = "channels",
             method: Method = DEFAULT_METHOD, floor: float = FLOOR, round_to: int | None = None,
             seed: int = 0, costs: TextCosts | None = None) -> TextPlan:
        """The same share of every layer's components removed, at least `target` of them
        (`target_kind="channels"`), of the MACs per sentence (`"macs"`) or of the latency
        `costs` predicts (`"latency"`).

        Args:
            round_to: kept components per layer are a multiple of this; default 8 neurons, 1 head.
            floor: share of each layer's components always kept (at least one).
            costs: the encoder's cost model (`text.latency.measured_text_costs`): needed for a
                latency target; with any target, the plan then carries its predicted latency.
        """
        check_target(target)
        counts, removed, rankings = self._counts(kind, method, target_kind, floor, round_to, seed,
                                                 costs)
        kept = counts(least_knob(removed, target, what=target_units(kind, target_kind),
                                 monotone=target_kind != "latency"))
        groups = self.groups(kind)
        chosen = tuple(tuple(sorted(rankings[g.name].order[:kept[g.name]])) for g in groups)
        latency = (costs.dense_ms, costs.predict(kind, list(kept.values()))) if costs else ()
        return TextPlan(kind, method, target, target_kind, tuple(g.size for g in groups), chosen,
                        self.macs, self.macs - self.saved_macs(kind, kept), *latency)


def analyse_text(model: nn.Module, texts: Sequence[str], *, device: torch.device | str,
                 lam: float = 1e-4, batch_size: int = 64) -> TextAnalysis:
    """Per-token statistics and fidelities of every FFN down-projection and attention output.

    Args:
        model: a sentence-transformers BERT-style encoder on `device`; only read.
        texts: unlabeled calibration texts.
        lam: ridge strength of the compensation solves, relative to the mean diagonal.
    """
    if not texts:
        raise UserError("no calibration texts; pass at least one")
    start = time.perf_counter()
    model = private_copy(model)
    layers = transformer_layers(model)
    names = [layer.ffn_down for layer in layers] + [layer.attention_out for layer in layers]
    moments = token_moments(model, texts, names, device=device, batch_size=batch_size)
    fidelity = {}
    for layer in layers:
        for kind in ("ffn", "heads"):
            name = consumer(layer, kind)
            weight = model.get_submodule(name).weight  # (c_out, c_in) -> (c_out, units, block)
            units = weight.shape[1] // block(layer, kind)
            fidelity[name] = LayerFidelity.from_moments(weight.view(weight.shape[0], units, -1),
                                                        moments[name], lam=lam)
    lengths = token_lengths(model, texts)  # tokenized once, for both cost models
    hidden = model.get_submodule(layers[0].ffn_down).out_features
    counts = torch.tensor(lengths, dtype=torch.float64)
    cost = TokenCost(hidden, float(counts.mean()), float(counts.square().mean()))
    return TextAnalysis(model, layers, moments, fidelity, cost, macs_at(model, lengths)[""],
                        len(texts), time.perf_counter() - start)


def token_lengths(model: nn.Module, texts: Sequence[str]) -> list[int]:
    """Tokens of each text after the model's own truncation (in the order of `texts`)."""
    lengths = [0] * len(texts)
    for index, features in token_batches(model, texts, device="cpu"):
        for i, n in zip(index.tolist(), features["attention_mask"].sum(1).tolist()):
            lengths[i] = int(n)
    return lengths


def sentence_macs(model: nn.Module, texts: Sequence[str]) -> float:
    """Mean multiply-accumulates per sentence at the texts' own token lengths (no padding)."""
    return macs_by_module(model, texts)[""]


def macs_by_module(model: nn.Module, texts: Sequence[str]) -> dict[str, float]:
    """Mean MACs per sentence of every module (by name; "" is the whole model) at the texts'
    own token lengths."""
    return macs_at(model, token_lengths(model, texts))


def macs_at(model: nn.Module, lengths: Sequence[int]) -> dict[str, float]:
    """Mean MACs per sentence of every module over sentences of these token lengths.

    An encoder's MACs are exactly quadratic in the length T (linear layers ∝ T, attention scores
    and their product with V ∝ T², the pooler constant), so `torch.utils.flop_counter` counts
    three lengths and the mean follows from E[T] and E[T²] (`metrics.count_flops`, which counts
    the CPU's attention kernels too).
    """
    from modhifi.metrics import count_flops

    device = next(model.parameters()).device
    modules = [name for name, _ in model.named_modules() if name]
    probes = (8, 16, 32)
    # token 0: every vocabulary has it, and the count is the same for any; (features,): called
    # as model(features)
    batches = [({"input_ids": torch.zeros(1, length, dtype=torch.long, device=device),
                 "attention_mask": torch.ones(1, length, dtype=torch.long, device=device),
                 "token_type_ids": torch.zeros(1, length, dtype=torch.long, device=device)},)
               for length in probes]
    counted = [{"": total / 2, **{name: n / 2 for name, n in flops.items()}}
               for total, flops in count_flops(model, batches, modules)]
    # MACs(T) = a + b T + c T²: three lengths give a, b, c exactly, per module.
    powers = torch.tensor([[1.0, t, t * t] for t in probes], dtype=torch.float64)
    names = sorted(counted[0])
    values = torch.tensor([[c.get(n, 0.0) for n in names] for c in counted], dtype=torch.float64)
    a, b, c = torch.linalg.solve(powers, values)                  # (modules,) each
    lengths = torch.tensor(lengths, dtype=torch.float64)
    mean = a + b * lengths.mean() + c * lengths.square().mean()
    return dict(zip(names, mean.tolist()))


def cost_parts(model: nn.Module, texts: Sequence[str]) -> pd.DataFrame:
    """Where an encoder's parameters and MACs per sentence are: embeddings, attention
    projections (query, key, value, output), attention scores (QKᵀ and AV), FFN, pooler."""
    macs = macs_by_module(model, texts)
    layers = transformer_layers(model)
    parts = {"embeddings": ["0.model.embeddings"],
             "attention projections": [n for l in layers
                                       for n in (l.query, l.key, l.value, l.attention_out)],
             "FFN": [n for l in layers for n in (l.ffn_up, l.ffn_down)],
             "pooler": ["0.model.pooler"]}
    modules = dict(model.named_modules())
    params = {part: sum(p.numel() for name in names if name in modules
                        for p in modules[name].parameters())
              for part, names in parts.items()}
    spent = {part: sum(macs.get(name, 0.0) for name in names) for part, names in parts.items()}
    spent["attention scores"] = sum(
        macs.get(l.query.rsplit(".", 1)[0], 0.0)
        - sum(macs.get(n, 0.0) for n in (l.query, l.key, l.value)) for l in layers)
    params["attention scores"] = 0
    total_params = sum(p.numel() for p in model.parameters())
    params["norms and the rest"] = total_params - sum(params.values())
    spent["norms and the rest"] = max(0.0, macs[""] - sum(spent.values()))
    frame = pd.DataFrame({"part": list(params), "params": list(params.values()),
                          "macs": [spent[p] for p in params]})
    frame["macs_share"] = frame["macs"] / macs[""]
    return frame

