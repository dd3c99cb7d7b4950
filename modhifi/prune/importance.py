"""Importance: one ranking of each channel group, best channel first (method.md §3.4).

Each importance is a small callable `(group, evidence) -> Ranking` in the registry
`IMPORTANCES`, keyed by the `Method` names that the CLI, the pages and the benchmarks list: the
paper's union of HiFi sets, greedy subset fidelity, and the baselines (L1 filter norm, activation
magnitude, random), all read from the same `Evidence`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modhifi.fidelity import LayerFidelity, greedy_subset
from modhifi.options import Method, check
from modhifi.prune.structure import ChannelGroup


@dataclass(frozen=True)
class Evidence:
    """What an importance may read about the model: its weights and its statistics."""

    model: nn.Module = field(repr=False)  # the analysed model (read only)
    fidelity: Mapping[str, LayerFidelity] = field(repr=False)  # consumer -> its fidelity
    seed: int = 0  # for the random baseline


@dataclass(frozen=True)
class Ranking:
    """Channels of one group in keep order, and a score in [0, 1] that never rises along it."""

    order: tuple[int, ...]
    score: tuple[float, ...]
    # Greedy only: the fidelity each channel added when it was chosen, in order (Σ over the
    # consumers' outputs of the gain in FS_c, `fidelity.greedy_subset`); empty otherwise.
    gain: tuple[float, ...] = ()


def ranking_of(order: torch.Tensor, score: torch.Tensor, *, gain: bool = False) -> Ranking:
    """Normalise `score` (given in `order`) to [0, 1] and make it non-increasing along the order;
    with `gain`, keep the raw scores as `Ranking.gain`."""
    normalised = score.double() / score.max().clamp(min=1e-30)
    return Ranking(tuple(order.tolist()), tuple(normalised.cummin(0).values.tolist()),
                   tuple(score.double().tolist()) if gain else ())


def modhifi_ranking(group: ChannelGroup, evidence: Evidence) -> Ranking:
    """The union rule (§3.4): priority = best rank in any output channel of any consumer.

    A channel in the HiFi set (top-k by singleton fidelity) of one output of one consumer is
    kept at size k; ties are broken by the largest singleton fidelity.
    """
    priority = torch.full((group.size,), float("inf"), dtype=torch.float64)
    best = torch.zeros(group.size, dtype=torch.float64)
    for name, index in group.consumers:
        s = evidence.fidelity[name].singleton[:, list(index)].cpu()  # (c_out, group size)
        by_fidelity = s.argsort(1, descending=True)                 # (c_out, group size)
        rank = torch.empty_like(by_fidelity).scatter_(              # rank_c(i), 0 = best: the
            1, by_fidelity, torch.arange(group.size).expand_as(by_fidelity))  # inverse order
        priority = torch.minimum(priority, rank.min(0).values.double())
        best = torch.maximum(best, s.max(0).values)
    order = torch.argsort(priority * 2 + (1 - best), stable=True)  # lexicographic: rank, then -s
    return ranking_of(order, best[order])


def greedy_ranking(group: ChannelGroup, evidence: Evidence) -> Ranking:
    """Greedy subset fidelity: keep first the channel that adds the most refit fidelity, summed
    over every output of every consumer, given the channels already kept (fidelity.greedy_subset)."""
    consumers = [(evidence.fidelity[name], index) for name, index in group.consumers]
    order, gains = greedy_subset(consumers, group.size)
    return ranking_of(torch.tensor(order), torch.tensor(gains), gain=True)


def l1_ranking(group: ChannelGroup, evidence: Evidence) -> Ranking:
    """Baseline: L1 norm of each channel's filters, summed over the group's producers."""
    weights = (evidence.model.get_submodule(p).weight.detach() for p in group.producers)
    norm = sum(w.abs().flatten(1).sum(1).double().cpu() for w in weights)
    order = norm.argsort(descending=True)
    return ranking_of(order, norm[order])


def activation_ranking(group: ChannelGroup, evidence: Evidence) -> Ranking:
    """Baseline: root-mean-square activation of each channel at its consumers' inputs."""
    energy = torch.zeros(group.size, dtype=torch.float64)
    for name, index in group.consumers:
        # Input channels as the fidelity sees them: a conv's, or a text encoder's heads (blocks).
        fidelity = evidence.fidelity[name]
        c_in = fidelity.weight.shape[1]
        # E[Σ P²]: (c_in·K,) -> mean over a channel's K taps (or head features) -> (c_in,)
        energy += fidelity.mean_square().cpu().view(c_in, -1).mean(1)[list(index)]
    rms = energy.sqrt()
    order = rms.argsort(descending=True)
    return ranking_of(order, rms[order])


def random_ranking(group: ChannelGroup, evidence: Evidence) -> Ranking:
    """Baseline: a seeded random order."""
    generator = torch.Generator().manual_seed(evidence.seed + group.size)
    order = torch.randperm(group.size, generator=generator)
    return ranking_of(order, torch.linspace(1, 1 / group.size, group.size))


Importance = Callable[[ChannelGroup, Evidence], Ranking]

IMPORTANCES: dict[str, Importance] = {
    "modhifi-greedy": greedy_ranking,
    "modhifi": modhifi_ranking,
    "l1": l1_ranking,
    "random": random_ranking,
    "activation": activation_ranking,
}


def rank(groups: tuple[ChannelGroup, ...], method: Method, evidence: Evidence) -> dict[str, Ranking]:
    """group name -> the Ranking of its channels by `method`."""
    importance = IMPORTANCES[check(Method, method)]
    return {group.name: importance(group, evidence) for group in groups}
