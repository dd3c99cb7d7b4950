"""Torch-Pruning's own pruners as benchmark rows: the groups ModHiFi-P prunes, at matched MACs.

A benchmark adapter, not library code. `prune` runs `tp.pruner.BasePruner` (1.6's name for
MetaPruner, which stays as a deprecated alias) with uniform allocation (`global_pruning=False`,
like our default) on a copy of the model, restricted to the channel groups that
`modhifi.prune.trace_structure` finds; `matched_ratio` finds the pruning ratio whose MACs come
closest to a goal (our plan's), so that rows compare at equal cost.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from modhifi.metrics import count_cost
from modhifi.prune import Structure

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (normalised images, labels)

# name -> (importance factory, needs labels). LAMP's normalisation preserves the order within a
# group, so under uniform allocation it keeps the same channels as the L2 magnitude.
IMPORTANCES: dict[str, tuple[Callable[[], tp.importance.Importance], bool]] = {
    "tp-magnitude-l1": (lambda: tp.importance.MagnitudeImportance(p=1), False),
    "tp-magnitude-l2": (lambda: tp.importance.MagnitudeImportance(p=2), False),
    "tp-lamp": (lambda: tp.importance.LAMPImportance(), False),
    "tp-activation": (lambda: tp.importance.ActivationImportance(), False),
    "tp-taylor": (lambda: tp.importance.TaylorImportance(), True),
}


def ignored_layers(model: nn.Module, structure: Structure) -> list[nn.Module]:
    """Every Conv2d/Linear that produces none of ModHiFi-P's groups (the head, ViT attention...).

    Torch-Pruning skips a group when any layer whose outputs it cuts is ignored, so this leaves
    it exactly the groups ours prunes.
    """
    producers = {name for group in structure.groups for name in group.producers}
    return [m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in producers]


def prune(model: nn.Module, method: str, ratio: float, *, structure: Structure,
          input_shape: tuple[int, ...], calibration: Batches = (), round_to: int = 8) -> nn.Module:
    """A pruned copy of `model`: `ratio` of every group's channels cut, ranked by `method`.

    Args:
        method: a key of IMPORTANCES.
        ratio: Torch-Pruning's `pruning_ratio`, the same share of every group.
        calibration: (images, labels) batches for the activation (images) and Taylor (both)
            importances.
        round_to: kept channels per group are rounded down to a multiple of this.
    """
    pruned = copy.deepcopy(model).eval()
    importance = IMPORTANCES[method][0]()
    device = next(model.parameters()).device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unwrapped parameters (ViT tokens) are simply not pruned
        if isinstance(importance, tp.importance.ActivationImportance):
            # Its hooks keep only the last forward's statistics: one pass over all the images.
            with importance.compute_importance(pruned), torch.no_grad():
                pruned(torch.cat([images for images, _ in calibration]))
        elif isinstance(importance, tp.importance.TaylorImportance):
            _accumulate_gradients(pruned, calibration)
        pruner = tp.pruner.BasePruner(
            pruned, torch.zeros(1, *input_shape, device=device), importance,
            global_pruning=False, pruning_ratio=ratio, round_to=round_to,
            ignored_layers=ignored_layers(pruned, structure))
        pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def _accumulate_gradients(model: nn.Module, calibration: Batches) -> None:
    """∂(mean cross-entropy over all calibration images)/∂w into every parameter's .grad."""
    model.zero_grad(set_to_none=True)
    total = sum(len(labels) for _, labels in calibration)
    with torch.enable_grad():
        for images, labels in calibration:
            (F.cross_entropy(model(images), labels, reduction="sum") / total).backward()


def matched_ratio(model: nn.Module, goal_macs: int, *, structure: Structure,
                  input_shape: tuple[int, ...], round_to: int = 8,
                  steps: int = 16) -> tuple[float, int]:
    """The pruning ratio whose MACs come closest to `goal_macs`, and those MACs.

    Bisection on fresh copies. Under uniform allocation every group keeps a number of channels
    set by the ratio alone, so the MACs do not depend on the importance and the cheap L1
    magnitude stands in for all of them.
    """
    cache: dict[float, int] = {}

    def macs(ratio: float) -> int:
        if ratio not in cache:
            pruned = prune(model, "tp-magnitude-l1", ratio, structure=structure,
                           input_shape=input_shape, round_to=round_to)
            cache[ratio] = count_cost(pruned, input_shape).macs
        return cache[ratio]

    # Torch-Pruning keeps int(size * (1 - ratio)) channels rounded down to `round_to`: above
    # this ratio the smallest group would be left with none.
    highest = 1 - (round_to + 0.5) / min(group.size for group in structure.groups)
    low, high = 0.0, highest  # macs(low) > goal >= macs(high) once the goal is reachable
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if macs(middle) > goal_macs else (low, middle)
    best = min((low, high), key=lambda r: abs(macs(r) - goal_macs))
    return best, macs(best)
