"""Whether HiFi sets exist (method.md §6): the smallest top-k set by singleton fidelity that
reaches a fidelity level, against a random-subset search, for the trained model and the same
architecture untrained.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.fidelity import LayerFidelity, hifi_size
from modhifi.options import HIFI_LEVEL, HIFI_SHARE
from modhifi.prune import Analysis, analyse, recalibrate_batchnorm
from modhifi.training import seeded

UNTRAINED_IMAGES = 256  # calibration images the untrained architecture is recalibrated and
#                         analysed on


@dataclass(frozen=True, eq=False)
class RandomOrder(LayerFidelity):
    """A layer whose inputs are ranked at random: its fidelity curves (hence `hifi_size`) follow
    random nested subsets instead of the singleton ranking (FS itself is unchanged)."""

    scores: Tensor = field(kw_only=True)  # (c_out, c_in) random priorities

    @cached_property
    def singleton(self) -> Tensor:
        return self.scores


def random_search(fidelity: LayerFidelity, *, level: float, trials: int,
                   generator: torch.Generator) -> Tensor:
    """(c_out,) per output, the smallest share at which any of `trials` random orders reaches
    `level`; each order's prefixes are uniform random subsets of every size."""
    c_out, c_in = fidelity.weight.shape[:2]
    weight = fidelity.weight.repeat(trials, *[1] * (fidelity.weight.dim() - 1))  # (trials·c_out, …)
    scores = torch.rand(trials * c_out, c_in, generator=generator, dtype=torch.float64)
    shares = hifi_size(RandomOrder(fidelity.H, weight, fidelity.lam, fidelity.means,
                                   scores=scores.to(fidelity.H)),
                       level=level)
    return shares.view(trials, c_out).min(0).values


def _existence_rows(label: str, fidelity: Mapping[str, LayerFidelity], *, level: float,
                    trials: int, outputs: int | None, seed: int) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name, f in fidelity.items():
        c_out, c_in = f.weight.shape[:2]
        if outputs is not None and outputs < c_out:  # the same outputs for both searches
            rows_ = torch.randperm(c_out, generator=generator)[:outputs].sort().values
            f = replace(f, weight=f.weight[rows_.to(f.weight.device)])
        topk = hifi_size(f, level=level)                                 # (outputs,)
        search = random_search(f, level=level, trials=trials, generator=generator)
        rows.append((label, name, c_in, len(topk), float(topk.median()), float(search.median()),
                     float((topk <= search).double().mean())))
    return rows


@dataclass(frozen=True, eq=False)
class HifiExistence:
    """Smallest input shares reaching a fidelity level, top-k against a random search."""

    # model ("trained"/"untrained"), layer, inputs, outputs (sampled), topk_share, random_share
    # (medians over the outputs), topk_not_worse
    table: pd.DataFrame = field(repr=False)
    level: float
    threshold: float  # a layer "has HiFi sets" when its median top-k share is below this

    def share(self, model: str = "trained") -> float:
        """Share of `model`'s layers whose median top-k share is below `threshold`."""
        rows = self.table[self.table.model == model]
        return float((rows.topk_share < self.threshold).mean()) if len(rows) else math.nan

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()


def untrained_analysis(build: Callable[[], nn.Module], analysis: Analysis, *,
                       images: int = UNTRAINED_IMAGES, seed: int = 0,
                       batches: list[Tensor] | None = None) -> Analysis:
    """The same architecture with fresh random weights, BatchNorm statistics recalibrated on
    the first `images` of `analysis`'s calibration data (or on `batches`, when given) and
    analysed on them (the global RNG is left as it was). A few hundred images are plenty for the
    medians compared here (a conv layer sees thousands of patches per image) at a fraction of
    the full analysis's cost. It runs in this process alone: when several share the analysis,
    each passes the same first images as `batches` and gets the same result."""
    with seeded(seed):
        model = build()
    device = analysis.calibration[0].device
    model = model.eval().to(device)
    if batches is None:
        batches = torch.cat(list(analysis.calibration))[:images].split(128)
    recalibrate_batchnorm(model, batches)
    return analyse(model, batches, device=device, input_shape=analysis.input_shape)


def hifi_existence(fidelity: Mapping[str, LayerFidelity], *,
                   untrained: Mapping[str, LayerFidelity] | None = None, level: float = HIFI_LEVEL,
                   threshold: float = HIFI_SHARE, trials: int = 4, outputs: int | None = None,
                   seed: int = 0) -> HifiExistence:
    """Per consumer layer: the median over output channels of the smallest input share reaching
    fidelity `level` with the top-k by singleton fidelity, and with the best of `trials` random
    subsets of each size (each random order's prefixes are one subset of every size).

    Args:
        fidelity: the trained model's layers, e.g. `analysis.fidelity`.
        untrained: the same for the architecture untrained (`untrained_analysis(...).fidelity`).
        outputs: output channels sampled per layer (the same for both searches); None: all,
            so that the trained model's `topk_share` is the Fidelity page's HiFi share
            (`prune.tables.hifi_table`) to the digit.

    Returns:
        A `HifiExistence`; `topk_not_worse` is the share of outputs where top-k needs no more
        inputs than the random search.
    """
    rows = _existence_rows("trained", fidelity, level=level, trials=trials, outputs=outputs,
                           seed=seed)
    if untrained is not None:
        rows += _existence_rows("untrained", untrained, level=level, trials=trials,
                                outputs=outputs, seed=seed)
    table = pd.DataFrame(rows, columns=["model", "layer", "inputs", "outputs", "topk_share",
                                        "random_share", "topk_not_worse"])
    return HifiExistence(table, level, threshold)
