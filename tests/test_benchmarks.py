"""The Torch-Pruning adapter of benchmarks/quality.py: the groups ours prunes, at matched MACs."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modhifi import nets
from modhifi.metrics import count_cost
from modhifi.prune import trace_structure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _torch_pruning import IMPORTANCES, matched_ratio, prune


def _widths(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("build, goal", [(nets.ResNet, 0.5), (nets.vgg, 0.4), (nets.ViT, 0.75)])
def test_matched_ratio_reaches_the_goal_macs_on_the_groups_ours_prunes(build, goal):
    torch.manual_seed(0)
    model, shape = build().eval(), (1, 28, 28)
    structure = trace_structure(model, shape)
    before = _widths(model)
    ratio, macs = matched_ratio(model, int(goal * structure.macs), structure=structure,
                                input_shape=shape, round_to=1)
    pruned = prune(model, "tp-magnitude-l1", ratio, structure=structure, input_shape=shape,
                   round_to=1)
    assert count_cost(pruned, shape).macs == macs
    assert abs(macs / (goal * structure.macs) - 1) < 0.03
    assert _widths(model) == before  # the input model is untouched
    # Only producers of our groups lose outputs (the head and, in the ViT, all but fc1 keep them).
    producers = {name for group in structure.groups for name in group.producers}
    assert {name for name, w in _widths(pruned).items() if w[0] < before[name][0]} == producers


def test_every_importance_cuts_to_the_same_macs_at_one_ratio():
    # matched_ratio bisects with one importance and relies on the MACs not depending on it.
    torch.manual_seed(0)
    model, shape = nets.ResNet().eval(), (1, 28, 28)
    structure = trace_structure(model, shape)
    calibration = [(torch.randn(16, *shape), torch.randint(0, 10, (16,))) for _ in range(2)]
    macs = {method: count_cost(prune(model, method, 0.4, structure=structure, input_shape=shape,
                                     calibration=calibration), shape).macs
            for method in IMPORTANCES}
    assert len(set(macs.values())) == 1 and macs["tp-taylor"] < structure.macs
    assert all(p.grad is None for p in model.parameters())
