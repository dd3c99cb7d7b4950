"""The benchmarks' own machinery: the Torch-Pruning adapter of benchmarks/quality.py (the groups
ours prunes, at matched MACs) and the gradient baselines of benchmarks/unlearn_baselines.py."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modhifi import nets
from modhifi.metrics import count_cost
from modhifi.prune import trace_structure
from modhifi.unlearn import other_classes
from oracles import assert_unchanged, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _torch_pruning import IMPORTANCES, matched_ratio, prune
from unlearn_baselines import BASELINES, run_baseline


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


@pytest.mark.parametrize("baseline", list(BASELINES), ids=lambda b: b.name)
def test_gradient_baselines_train_a_copy_with_batchnorm_frozen(baseline):
    """The unlearning baselines change only a copy's weights, keep BatchNorm's statistics, stop
    at the step budget, and move the forget class the way they claim (ascent: fewer of its calibration
    images recognised; retain fine-tuning: retain loss down)."""
    from conftest import subject

    digits = subject("digits-cnn")
    model, calibration = digits.loaded.model, digits.dataset.calibration
    before = {k: v.clone() for k, v in model.state_dict().items()}
    untouched = snapshot(model)
    forget = calibration.subset(calibration.labels == 3)
    images = forget if baseline.ascend else other_classes(calibration, forget_class=3, samples=None)
    # A step budget, not a time budget: the outcome must not depend on the machine's speed.
    trained, steps, _ = run_baseline(model, images, baseline, budget_s=math.inf, max_steps=100,
                                     device=torch.device("cpu"))
    assert_unchanged(model, untouched)  # the input is intact
    assert all(p.grad is None for p in trained.parameters())
    buffers = dict(trained.named_buffers())
    assert all(torch.equal(buffers[k], before[k]) for k in buffers if "running" in k)
    # Stops at the step budget (ascent sooner once a whole batch is misclassified).
    assert 1 <= steps <= 100 and (baseline.ascend or steps == 100)
    x, y = images.normalise(images.images), images.labels
    with torch.no_grad():
        loss = [nn.functional.cross_entropy(m(x), y).item() for m in (model, trained)]
    assert loss[1] > loss[0] if baseline.ascend else loss[1] < loss[0]
