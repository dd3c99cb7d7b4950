"""ModHiFi-P, structured pruning without gradients or labels (method.md §3): score → plan → apply.

- `analyse` traces which channels are coupled (Torch-Pruning's dependency graph), collects the
  input statistics of every consumer layer on calibration data once, and builds their fidelities.
- `Analysis.plan` turns a target (a fraction of channels or of MACs) into a `PrunePlan`: a plain
  value listing, per coupled group, the channels kept and removed, with the resulting MACs and
  parameters computed exactly before anything changes.
- `Analysis.apply` returns a new, physically smaller model: consumers compensated (`rescale`,
  the paper's δ*, or `refit`, full least squares), channels cut by Torch-Pruning, BatchNorm
  recalibrated. The input model is never modified.

Channels are ranked by the paper's union of HiFi sets (`modhifi`), by greedy subset fidelity
(`modhifi-greedy`), or by a baseline (random, L1 filter norm, activation magnitude), all through
the same path.
"""
from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch_pruning as tp
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping
from torch import nn

from modhifi.batch import Batch, call, example_of, head, size, to_device
from modhifi.errors import UserError
from modhifi.fidelity import (
    LayerFidelity,
    LayerMoments,
    collect_moments,
    greedy_subset,
    hifi_size,
)
from modhifi.hooks import private_copy
from modhifi.metrics import channels_last, count_cost
from modhifi.options import (WHY_ROUND_TO, WHY_STEPS, Allocation, Compensation, Method, Scope,
                             TargetKind, check, check_target, check_whole)

# The operations a prunable group may pass through: anything else (LayerNorm, attention heads,
# concatenation, unwrapped parameters) couples channels in ways we do not prune.
_PASS_THROUGH = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU,
                 nn.SiLU, nn.Hardswish, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.Flatten)
_PASS_THROUGH_OPS = ("_ElementWiseOp", "_ReshapeOp")
# Torch-Pruning calls every functional op it does not know "element-wise". Only these act on each
# channel alone (autograd names, without "Backward"); any other (the matmuls of attention, the
# transpose of a channel shuffle, a softmax or a mean over an unknown axis) mixes channels, so a
# group through it is left whole: never cut half-way, e.g. a value projection without its query.
_CHANNELWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Clone", "Relu", "Relu6", "Gelu", "Silu", "Sigmoid",
    "Tanh", "Elu", "LeakyRelu", "Hardswish", "Hardsigmoid", "Hardtanh", "Clamp", "Threshold",
    "MaxPool2DWithIndices", "AvgPool2D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D"})


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, with the layers that make and read them."""

    name: str                          # the first producer's module name
    size: int
    producers: tuple[str, ...]         # layers whose output channels these are
    consumers: tuple[tuple[str, tuple[int, ...]], ...]  # (layer, its input index of each channel)
    norms: tuple[str, ...]             # BatchNorms over these channels


@dataclass(frozen=True)
class _Layer:
    """What the exact MACs/params bookkeeping needs to know about one Conv2d/Linear/BatchNorm."""

    macs: int
    weight: int          # parameters in the weight
    bias: int
    per_channel: bool    # depthwise conv or norm: the weight scales with the output channels only
    in_group: str | None
    out_group: str | None


@dataclass(frozen=True)
class Structure:
    """The coupled channel groups of a model and the per-layer sizes needed to cost a plan."""

    groups: tuple[ChannelGroup, ...]
    layers: dict[str, _Layer] = field(hash=False)
    macs: int
    params: int
    followed_by_norm: frozenset[str]   # layers whose output goes straight into a BatchNorm

    @property
    def consumers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for g in self.groups for name, _ in g.consumers))

    def group(self, name: str) -> ChannelGroup:
        return next(g for g in self.groups if g.name == name)

    def cost(self, kept: dict[str, int]) -> tuple[int, int]:
        """(MACs, params) of the model once each group keeps `kept[group]` channels."""
        sizes = {g.name: g.size for g in self.groups}

        def share(group: str | None) -> float:
            return kept.get(group, sizes[group]) / sizes[group] if group else 1.0

        macs, params = self.macs, self.params
        for layer in self.layers.values():
            out = share(layer.out_group)
            inp = 1.0 if layer.per_channel else share(layer.in_group)
            macs -= layer.macs - round(layer.macs * inp * out)
            params -= layer.weight - round(layer.weight * inp * out) + layer.bias - round(layer.bias * out)
        return macs, params


def dependency_graph(model: nn.Module, example: torch.Tensor
                     ) -> tuple[tp.DependencyGraph, frozenset[tp.Node]]:
    """Torch-Pruning's dependency graph of `model`, and its reshapes that are not one-to-one.

    A group that passes through such a reshape (a feature map flattened into a Linear, a Swin
    window partition) is never pruned (`_as_group`). Torch-Pruning would still expand each channel
    into all its flattened positions while collecting the group, which runs out of memory on
    window attention (tens of GiB for swin_t at 64×64), so these reshapes are recorded, then made
    plain pass-throughs that Torch-Pruning maps one-to-one.

    Raises:
        UserError: when Torch-Pruning cannot trace the model at all.
    """
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except (ZeroDivisionError, IndexError, KeyError, ValueError, TypeError) as error:
        raise UserError(f"Torch-Pruning cannot trace the channels of this model "
                        f"({type(error).__name__} in its {_failing_stage(error)}; a channel "
                        "shuffle or an unusual reshape or concatenation does this): it cannot be "
                        "pruned") from None
    nodes = list(graph.module2node.values())
    flattening = frozenset(node for node in nodes if node.type == tp.ops.OPTYPE.RESHAPE and any(
        isinstance(m, _FlattenIndexMapping) for dep in node.dependencies for m in dep.index_mapping))
    for node in flattening:
        node.type = tp.ops.OPTYPE.ELEMENTWISE  # Torch-Pruning re-maps only RESHAPE nodes
    for node in nodes:
        for dep in node.dependencies:
            dep.index_mapping = [None if isinstance(m, _FlattenIndexMapping) else m
                                 for m in dep.index_mapping]
    return graph, flattening


def _failing_stage(error: BaseException) -> str:
    """Torch-Pruning's function where `error` was raised, e.g. update_reshape_index_mapping."""
    frame = error.__traceback__
    while frame and frame.tb_next:
        frame = frame.tb_next
    return frame.tb_frame.f_code.co_name if frame else "graph"


def trace_structure(model: nn.Module, input_shape) -> Structure:
    """Find the prunable channel groups of `model` with Torch-Pruning's dependency graph.

    `input_shape`: the shape of one input, or a one-sample example of any form (`modhifi.batch`).
    """
    model = private_copy(model).cpu()
    names = {module: name for name, module in model.named_modules()}
    graph, flattening = dependency_graph(model, example_of(input_shape))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    groups = [g for g in (_as_group(group, names, graph, flattening) for group in
                          graph.get_all_groups(ignored_layers=head,
                                               root_module_types=(nn.Conv2d, nn.Linear))) if g]
    cost = count_cost(model, input_shape)
    per_layer = dict(cost.per_layer)
    owner = {}
    for group in groups:
        owner.update({(n, "out"): group.name for n in group.producers + group.norms})
        owner.update({(n, "in"): group.name for n, _ in group.consumers})
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
            bias = module.bias.numel() if module.bias is not None else 0
            per_channel = (isinstance(module, nn.modules.batchnorm._BatchNorm)
                           or getattr(module, "groups", 1) > 1)
            layers[name] = _Layer(per_layer.get(name, 0), module.weight.numel(), bias, per_channel,
                                  owner.get((name, "in")), owner.get((name, "out")))
    followed = frozenset(names[node.module] for node in graph.module2node.values()
                         if isinstance(node.module, (nn.Conv2d, nn.Linear))
                         and any(isinstance(o.module, nn.modules.batchnorm._BatchNorm)
                                 for o in node.outputs))
    return Structure(tuple(groups), layers, cost.macs, cost.params, followed)


def _multiplies_a_weight(grad_fn) -> bool:
    """A transpose of a parameter, or a matrix product with one (what nn.Linear runs); not a
    product of two activations (attention)."""
    inputs = [f for f, _ in getattr(grad_fn, "next_functions", ()) if f is not None]
    if grad_fn.name().startswith("TBackward"):
        return any(type(f).__name__ == "AccumulateGrad" for f in inputs)
    return any(f.name().startswith("TBackward") and _multiplies_a_weight(f) for f in inputs)


def _is_channelwise(node: tp.Node) -> bool:
    """Whether a functional op that Torch-Pruning traced acts on each channel alone."""
    grad_fn = node.grad_fn
    name = (grad_fn.name() if hasattr(grad_fn, "name") else "").split("Backward")[0]
    if name in ("T", "Addmm", "Mm"):  # inside a Linear: its weight transposed, then x @ Wᵀ (+ b)
        return _multiplies_a_weight(grad_fn)
    if name == "Mean":  # a global average pool, if it keeps the channel axis
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        dims = getattr(grad_fn, "_saved_dim", None)
        if sizes is None or dims is None:
            return False
        channel = 1 if len(sizes) == 4 else len(sizes) - 1  # NCHW, or (N, [T,] C)
        return all(d % len(sizes) != channel for d in dims)
    return name in _CHANNELWISE_OPS


def _as_group(group: tp.Group, names: dict, graph: tp.DependencyGraph,
              flattening: frozenset[tp.Node]) -> ChannelGroup | None:
    """A ChannelGroup, or None when the group passes through something we do not prune."""
    producers, consumers, norms, size = [], [], [], None
    for dep, idxs in group:
        module, handler = dep.target.module, dep.handler
        size = size or len(idxs)
        kind = type(module).__name__
        if not isinstance(module, _PASS_THROUGH) and kind not in _PASS_THROUGH_OPS:
            return None
        if kind == "_ElementWiseOp" and not _is_channelwise(dep.target):
            return None
        if isinstance(module, nn.Conv2d) and 1 < module.groups and not (
                module.groups == module.in_channels == module.out_channels):
            return None  # grouped (not depthwise): a cut would leave counts `groups` cannot divide
        if len(idxs) != size or dep.target in flattening:  # e.g. a feature map flattened
            return None
        if graph.is_out_channel_pruning_fn(handler) and isinstance(module, (nn.Conv2d, nn.Linear)):
            producers.append(names[module])
        elif graph.is_in_channel_pruning_fn(handler) and isinstance(module, (nn.Conv2d, nn.Linear)):
            if getattr(module, "groups", 1) == 1:
                consumers.append((names[module], tuple(int(i) for i in idxs)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            norms.append(names[module])
    if not producers or not consumers:
        return None
    return ChannelGroup(producers[0], size, tuple(producers), tuple(consumers), tuple(norms))


# --- scores: one ranking per group, best channel first --------------------------------------

@dataclass(frozen=True)
class Ranking:
    """Channels of one group in keep order, and a score in [0, 1] that never rises along it."""

    order: tuple[int, ...]
    score: tuple[float, ...]


def _ranking(order: torch.Tensor, score: torch.Tensor) -> Ranking:
    """Normalise `score` (given in `order`) to [0, 1] and make it non-increasing along the order."""
    score = score.double() / score.max().clamp(min=1e-30)
    return Ranking(tuple(order.tolist()), tuple(score.cummin(0).values.tolist()))


def modhifi_ranking(group: ChannelGroup, fidelity: dict[str, LayerFidelity]) -> Ranking:
    """The union rule (§3.4): priority = best rank in any output channel of any consumer.

    A channel in the HiFi set (top-k by singleton fidelity) of one output of one consumer is
    kept at size k; ties are broken by the largest singleton fidelity.
    """
    priority = torch.full((group.size,), float("inf"), dtype=torch.float64)
    best = torch.zeros(group.size, dtype=torch.float64)
    for name, index in group.consumers:
        s = fidelity[name].singleton[:, list(index)]               # (c_out, group size)
        rank = s.argsort(1, descending=True).argsort(1).double()   # rank_c(i), 0 = best
        priority = torch.minimum(priority, rank.min(0).values)
        best = torch.maximum(best, s.max(0).values)
    order = torch.argsort(priority * 2 + (1 - best), stable=True)  # lexicographic: rank, then -s
    return _ranking(order, best[order])


def greedy_ranking(group: ChannelGroup, fidelity: dict[str, LayerFidelity]) -> Ranking:
    """Greedy subset fidelity: keep first the channel that adds the most refit fidelity, summed
    over every output of every consumer, given the channels already kept (fidelity.greedy_subset)."""
    order, gains = greedy_subset([(fidelity[name], index) for name, index in group.consumers],
                                 group.size)
    return _ranking(torch.tensor(order), torch.tensor(gains))


def l1_ranking(group: ChannelGroup, model: nn.Module) -> Ranking:
    """Baseline: L1 norm of each channel's filters, summed over the group's producers."""
    norm = sum(model.get_submodule(p).weight.detach().abs().flatten(1).sum(1).double().cpu()
               for p in group.producers)
    order = norm.argsort(descending=True)
    return _ranking(order, norm[order])


def activation_ranking(group: ChannelGroup, moments: dict[str, LayerMoments],
                       model: nn.Module) -> Ranking:
    """Baseline: root-mean-square activation of each channel at its consumers' inputs."""
    energy = torch.zeros(group.size, dtype=torch.float64)
    for name, index in group.consumers:
        c_in = model.get_submodule(name).weight.shape[1]
        m = moments[name]
        # diag of Σ PᵀP / N: (c_in·k²,) -> mean over the k² taps -> (c_in,)
        energy += (m.second.diagonal().double().cpu() / m.samples).view(c_in, -1).mean(1)[list(index)]
    rms = energy.sqrt()
    order = rms.argsort(descending=True)
    return _ranking(order, rms[order])


def random_ranking(group: ChannelGroup, seed: int) -> Ranking:
    """Baseline: a seeded random order."""
    generator = torch.Generator().manual_seed(seed + group.size)
    order = torch.randperm(group.size, generator=generator)
    return _ranking(order, torch.linspace(1, 1 / group.size, group.size))


# --- plan: how many channels each group keeps, and which --------------------------------------

@dataclass(frozen=True)
class GroupPlan:
    """One group's part of a plan."""

    name: str
    size: int
    kept: tuple[int, ...]       # sorted channel indices
    removed: tuple[int, ...]


@dataclass(frozen=True)
class PrunePlan:
    """What `apply` will do, computed before anything changes."""

    method: str
    target: float
    target_kind: TargetKind
    allocation: Allocation
    scope: Scope
    groups: tuple[GroupPlan, ...]  # the groups in scope; the others keep every channel
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def channels_before(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def channels_after(self) -> int:
        return sum(len(g.kept) for g in self.groups)

    @property
    def speedup_macs(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def removed_channels(self) -> dict[str, list[int]]:
        """group (first producer's name) -> removed channel indices, for export."""
        return {g.name: list(g.removed) for g in self.groups if g.removed}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"group": [g.name for g in self.groups],
                             "channels": [g.size for g in self.groups],
                             "kept": [len(g.kept) for g in self.groups],
                             "removed": [len(g.removed) for g in self.groups]})


def _kept_counts(rankings: dict[str, Ranking], knob: float, allocation: Allocation,
                 floor: float, round_to: int) -> dict[str, int]:
    """Channels each group keeps at pruning strength `knob` in [0, 1]."""
    kept = {}
    for name, ranking in rankings.items():
        size = len(ranking.order)
        least = max(1, math.ceil(floor * size))
        if allocation == "uniform":
            count = max(least, size - round(knob * size))
        else:  # global: one threshold on the normalised score across groups
            count = max(least, sum(s >= knob for s in ranking.score))
        # Vector units and GEMM kernels run whole multiples of 8 (or 16) channels at full speed.
        kept[name] = min(size, -(-count // round_to) * round_to)
    return kept


# --- the analysis of one model on its calibration data ----------------------------------------

@dataclass(frozen=True)
class Analysis:
    """Structure, input statistics and fidelities of one model, computed once; plans come from it."""

    model: nn.Module = field(repr=False)   # the analysis' own eval-mode copy, never modified
    input_shape: tuple[int, ...] | Batch  # one input's shape, or a one-sample example
    structure: Structure
    moments: dict[str, LayerMoments] = field(repr=False)
    fidelity: dict[str, LayerFidelity] = field(repr=False)
    calibration: tuple[torch.Tensor, ...] = field(repr=False)  # normalised batches, on the device
    seconds: float
    caveats: tuple[str, ...] = ()  # why the numbers may mean little (see `calibration_caveats`)
    # (method, seed) -> rankings: they do not depend on the target, and the greedy one is costly.
    _rankings: dict[tuple[str, int], dict[str, Ranking]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    # Sessions share one Analysis: the first to ask for a ranking computes it, the others wait.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def ranking(self, method: Method, *, seed: int = 0) -> dict[str, Ranking]:
        """group name -> Ranking of its channels by `method` (computed once per method and seed)."""
        with self._lock:
            if (method, seed) not in self._rankings:
                self._rankings[method, seed] = self._rank(method, seed)
            return dict(self._rankings[method, seed])

    def _rank(self, method: Method, seed: int) -> dict[str, Ranking]:
        rank: dict[str, Callable[[ChannelGroup], Ranking]] = {
            "modhifi": lambda g: modhifi_ranking(g, self.fidelity),
            "modhifi-greedy": lambda g: greedy_ranking(g, self.fidelity),
            "l1": lambda g: l1_ranking(g, self.model),
            "activation": lambda g: activation_ranking(g, self.moments, self.model),
            "random": lambda g: random_ranking(g, seed),
        }
        return {g.name: rank[check(Method, method)](g) for g in self.structure.groups}

    def plan(self, target: float, *, target_kind: TargetKind = "channels",
             allocation: Allocation = "uniform", method: Method = "modhifi",
             scope: Scope = "all", floor: float = 0.05, round_to: int = 8,
             seed: int = 0) -> PrunePlan:
        """The plan that removes at least `target` of the channels (or of the MACs).

        Args:
            target: fraction in [0, 1) of prunable channels (target_kind="channels") or of the
                model's MACs (target_kind="macs") to remove.
            allocation: "uniform" (the same fraction of every group) or "global" (one threshold
                on the normalised score across groups).
            method: how channels are ranked: "modhifi" (the paper's union of singleton HiFi
                sets), "modhifi-greedy" (greedy subset fidelity under refit) or a baseline.
            scope: "all" groups, or "internal": only groups with a single producer, i.e. not
                the residual streams that several layers add into (inside residual blocks).
            floor: fraction of each group that is always kept.
            round_to: kept channels per group are rounded up to a multiple of this (1 = exact
                counts); multiples of 8 run measurably faster on CPUs and GPUs, multiples of 16
                on CPUs with AVX-512 (docs/results.md, "speed").
        """
        check_target(target)
        check(Allocation, allocation)
        check(TargetKind, target_kind)
        check(Scope, scope)
        check_whole("--round-to", round_to, WHY_ROUND_TO)
        if not 0 <= floor <= 1:
            raise UserError(f"floor {floor!r} must be a fraction in [0, 1] of each group kept")
        rankings = {name: ranking for name, ranking in self.ranking(method, seed=seed).items()
                    if scope == "all" or len(self.structure.group(name).producers) == 1}
        if not rankings:
            raise UserError(f"no channel group is in scope {scope!r} for this model; use "
                            "--scope all")
        total = sum(len(r.order) for r in rankings.values())

        def removed_share(knob: float) -> float:
            kept = _kept_counts(rankings, knob, allocation, floor, round_to)
            if target_kind == "channels":
                return 1 - sum(kept.values()) / total
            return 1 - self.structure.cost(kept)[0] / self.structure.macs

        # Removal grows with the knob (uniform: fraction removed; global: score threshold).
        low, high = 0.0, 1.0 + 1e-9
        if removed_share(high) < target:
            raise UserError(f"target {target:g} {target_kind} cannot be reached: at most "
                            f"{math.floor(removed_share(high) * 1000) / 1000:g} can be removed "
                            "with this model; lower it")
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if removed_share(middle) < target else (low, middle)
        kept = _kept_counts(rankings, high if target > 0 else 0.0, allocation, floor, round_to)
        groups = tuple(GroupPlan(g.name, g.size,
                                 tuple(sorted(rankings[g.name].order[:kept[g.name]])),
                                 tuple(sorted(rankings[g.name].order[kept[g.name]:])))
                       for g in self.structure.groups if g.name in rankings)
        macs, params = self.structure.cost(kept)
        return PrunePlan(method, target, target_kind, allocation, scope, groups,
                         self.structure.macs, macs, self.structure.params, params)

    def apply(self, plan: PrunePlan, *, compensation: Compensation = "refit",
              recalibrate: bool = True) -> nn.Module:
        """A new, physically pruned model: compensate consumers, cut channels, recalibrate BN."""
        check(Compensation, compensation)
        pruned = private_copy(self.model)
        removed = {g.name: g.removed for g in plan.groups}
        if compensation != "none":
            for name, keep in self._kept_inputs(removed).items():
                fidelity = self.fidelity[name]
                weight = (fidelity.refit_weight(keep) if compensation == "refit"
                          else fidelity.rescaled_weight(keep))
                pruned.get_submodule(name).weight.data.copy_(weight)
        cut_channels(pruned, removed, self.input_shape)
        if recalibrate:
            recalibrate_batchnorm(pruned, self.calibration)
        return pruned

    def score_table(self, plan: PrunePlan | None = None) -> pd.DataFrame:
        """Long table: layer, out_channel, in_channel, singleton_fidelity, saliency (, kept)."""
        frames = []
        for name, fidelity in self.fidelity.items():
            c_out, c_in = fidelity.singleton.shape
            frame = pd.DataFrame({
                "layer": name,
                "out_channel": torch.arange(c_out).repeat_interleave(c_in).numpy(),
                "in_channel": torch.arange(c_in).repeat(c_out).numpy(),
                "singleton_fidelity": fidelity.singleton.flatten().cpu().numpy(),
                "saliency": fidelity.saliency.flatten().cpu().numpy()})
            if plan is not None:
                kept = self._kept_inputs({g.name: g.removed for g in plan.groups}).get(name)
                frame["kept"] = True if kept is None else frame["in_channel"].isin(kept.tolist())
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def channel_table(self, plan: PrunePlan | None = None, *, method: Method = "modhifi") -> pd.DataFrame:
        """One row per (consumer layer, input channel): its scores, keep priority and fate.

        Columns: layer, channel, singleton (best over the layer's outputs), saliency_share (mean
        over outputs of r_ci / E‖Y_c‖², the share of each output that channel i explains),
        priority (0 = the first channel its group keeps), kept (under `plan`, True if none).
        """
        rankings, position = self.ranking(method), {}
        for group in self.structure.groups:
            for name, index in group.consumers:
                position.update({(name, index[j]): rank
                                 for rank, j in enumerate(rankings[group.name].order)})
        kept = self._kept_inputs({g.name: g.removed for g in plan.groups}) if plan else {}
        frames = []
        for name, fidelity in self.fidelity.items():
            c_in = fidelity.singleton.shape[1]
            share = fidelity.saliency / fidelity.energy.clamp(min=1e-30)[:, None]  # (c_out, c_in)
            frames.append(pd.DataFrame({
                "layer": name, "channel": range(c_in),
                "singleton": fidelity.singleton.max(0).values.cpu().numpy(),
                "saliency_share": share.mean(0).cpu().numpy(),
                "priority": [position.get((name, i), -1) for i in range(c_in)],
                "kept": [True] * c_in if name not in kept else
                        [i in set(kept[name].tolist()) for i in range(c_in)]}))
        return pd.concat(frames, ignore_index=True)

    def layer_scores(self, layer: str) -> dict[str, np.ndarray]:
        """(c_out, c_in) singleton fidelity and saliency share of one consumer layer."""
        fidelity = self.fidelity[layer]
        share = fidelity.saliency / fidelity.energy.clamp(min=1e-30)[:, None]
        return {"singleton": fidelity.singleton.cpu().numpy(), "saliency_share": share.cpu().numpy()}

    def fidelity_curve(self, layer: str, out_channel: int) -> pd.DataFrame:
        """FS(top-k) of one output channel against k, and which inputs the top-k adds."""
        fidelity = self.fidelity[layer]
        curve = fidelity.fidelity_curves()[out_channel]
        order = fidelity.singleton[out_channel].argsort(descending=True)
        return pd.DataFrame({"k": range(1, len(curve) + 1), "fidelity": curve.cpu().numpy(),
                             "added_channel": order.cpu().numpy()})

    def hifi_table(self, *, level: float = 0.8) -> pd.DataFrame:
        """Per consumer layer: the median over outputs of the smallest input share reaching `level`."""
        rows = [(name, f.w.shape[1], float(hifi_size(f, level=level).median()))
                for name, f in self.fidelity.items()]
        return pd.DataFrame(rows, columns=["layer", "inputs", "hifi_share"])

    def _kept_inputs(self, removed: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """consumer -> its kept input channels, for consumers that lose any."""
        lost: dict[str, set[int]] = {}
        for group in self.structure.groups:
            for name, index in group.consumers:
                lost.setdefault(name, set()).update(index[i] for i in removed.get(group.name, ()))
        return {name: torch.tensor(sorted(set(range(self.fidelity[name].w.shape[1])) - gone))
                for name, gone in lost.items() if gone}


def analyse(model: nn.Module, calibration: Iterable[Batch], *, device: torch.device,
            input_shape: tuple[int, ...] | None = None, lam: float = 1e-4,
            progress: Callable[[float], None] | None = None) -> Analysis:
    """Trace the model's channel groups and score every consumer layer on calibration batches.

    Args:
        model: the trained network, on `device`; only read (the analysis works on a copy).
        calibration: normalised, unlabeled input batches: tensors, or tuples or dicts of tensors
            (`modhifi.batch`; e.g. token ids with an attention mask).
        input_shape: (C, H, W) of one input; None: the first calibration sample is the example
            the structure is traced on.
        lam: ridge strength of the compensation solves, relative to the mean diagonal.
        progress: called with the share of calibration batches read so far (for progress bars).
    """
    import time

    start = time.perf_counter()
    # The analysis keeps its own eval-mode copy: the caller's model (perhaps in train mode, or
    # shared by several dashboard sessions) is only read, its BatchNorm buffers left as they are.
    model = private_copy(model)
    batches = tuple(to_device(b, device) for b in calibration)
    if not batches or not sum(size(b) for b in batches):
        raise UserError("the calibration set is empty; pass at least one unlabeled sample")
    if input_shape is None:  # inputs of any form: one calibration sample is the example
        input_shape = head(batches[0], 1)
    structure = trace_structure(model, input_shape)
    if not structure.groups:
        raise UserError("this model has no channel group ModHiFi can prune: it needs a Conv2d or "
                        "Linear layer whose outputs only a Conv2d or Linear reads (through "
                        "BatchNorm, activations or pooling)")
    consumers = structure.consumers

    def reporting():
        for done, batch in enumerate(batches, 1):
            yield batch
            if progress:
                progress(done / len(batches))

    moments = collect_moments(model, consumers, reporting(), device=device)
    fidelity = {name: LayerFidelity.from_moments(model.get_submodule(name).weight, moments[name],
                                                 centered=name in structure.followed_by_norm,
                                                 lam=lam)
                for name in consumers}
    return Analysis(model, input_shape, structure, moments, fidelity, batches,
                    time.perf_counter() - start,
                    calibration_caveats(model, sum(size(b) for b in batches)))


def calibration_caveats(model: nn.Module, images: int) -> tuple[str, ...]:
    """Warnings for a calibration set that is legal but too small for the statistics to mean much.

    Args:
        model: the network to be analysed.
        images: calibration images.

    Returns:
        One line per problem (none when the set is large enough).
    """
    widths = {name: m.weight.shape[1] for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    if not widths:
        return ()
    widest = max(widths, key=widths.get)
    if images >= widths[widest]:
        return ()
    return (f"{images} calibration images are fewer than the {widths[widest]} input channels of "
            f"{widest}: its statistics cannot tell those channels apart; use at least "
            f"{widths[widest]} (more is better)",)


def _size(plan: PrunePlan, target_kind: TargetKind) -> int:
    """What a target counts, before the plan: channels in scope or MACs."""
    return plan.channels_before if target_kind == "channels" else plan.macs_before


def prune_in_steps(model: nn.Module, calibration: Iterable[torch.Tensor], *, device: torch.device,
                   input_shape: tuple[int, ...], target: float, steps: int,
                   target_kind: TargetKind = "channels", allocation: Allocation = "uniform",
                   method: Method = "modhifi", scope: Scope = "all",
                   compensation: Compensation = "refit", recalibrate: bool = True,
                   round_to: int = 8) -> tuple[nn.Module, tuple[PrunePlan, ...]]:
    """The iterative mode: `steps` rounds of score → remove → compensate → recalibrate.

    Each round removes an equal share of the original channels (or MACs), re-scoring the model
    that the previous round left. Returns the pruned model and each round's plan.
    """
    check_whole("--steps", steps, WHY_STEPS)
    check_target(target)
    batches = tuple(b.to(device) for b in calibration)
    current, plans = model, []
    for step in range(1, steps + 1):
        analysis = analyse(current, batches, device=device, input_shape=input_shape)
        now = analysis.plan(0.0, target_kind=target_kind, scope=scope)  # the model as it is now
        done = 1 - _size(now, target_kind) / _size(plans[0], target_kind) if plans else 0.0
        goal = target * step / steps  # share of the original model removed after this round
        plan = analysis.plan(max(0.0, 1 - (1 - goal) / (1 - done)), target_kind=target_kind,
                             allocation=allocation, method=method, scope=scope, round_to=round_to)
        current = analysis.apply(plan, compensation=compensation, recalibrate=recalibrate)
        plans.append(plan)
    return current, tuple(plans)


# --- apply: surgery and BatchNorm recalibration ----------------------------------------------

def cut_channels(model: nn.Module, removed: dict[str, Iterable[int]], input_shape) -> None:
    """Remove channels in place: group (first producer's name) -> channel indices.

    Torch-Pruning's dependency graph cuts every coupled layer of a group together.
    """
    device = next(model.parameters()).device
    graph, _ = dependency_graph(model, example_of(input_shape, device))
    for name, index in removed.items():
        index = sorted(int(i) for i in index)
        if not index:
            continue
        layer = dict(model.named_modules()).get(name)
        width = getattr(layer, "out_channels", getattr(layer, "out_features", 0))
        if not width or not 0 <= index[0] <= index[-1] < width:
            raise UserError(f"cannot remove channels {index[:4]}… of {name}: the model has no "
                            "such layer or channels; pass a plan made for this model")
        prune_out = graph.get_pruner_of_module(layer).prune_out_channels
        group = graph.get_pruning_group(layer, prune_out, idxs=index)
        if not graph.check_pruning_group(group):
            raise UserError(f"cannot remove {len(index)} channels of {name}: a layer would "
                            "be left with none; lower the target")
        group.prune()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *,
                          chunk: int = 128) -> None:
    """Re-estimate BatchNorm running statistics with forward passes (no gradients, no labels).

    Runs in channels-last layout (oneDNN's faster convolutions) `chunk` images at a time, which
    keeps activations in cache, and hands the model back in the usual contiguous layout.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
        m.train()
    model.to(memory_format=torch.channels_last)
    try:
        for batch in batches:
            if not isinstance(batch, torch.Tensor):  # token ids with a mask, say: as it comes
                call(model, batch)
                continue
            for part in batch.split(chunk):
                model(channels_last(part))
    finally:
        model.to(memory_format=torch.contiguous_format)  # channels-last weights slow NCHW exports
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()
