"""Oracles for modhifi.theory: explicit operator matrices, a linear network computed by hand,
brute-force masking, and the local-to-global bound on the zoo models."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import subject
from modhifi import nets, theory
from modhifi.errors import UserError
from modhifi.fidelity import hifi_size, layer_fidelity
from modhifi.options import HIFI_SHARE
from modhifi.prune.tables import hifi_table
from modhifi.replay import Replay
from modhifi.prune import analyse, recalibrate_batchnorm
from modhifi.zoo import ZOO
from oracles import assert_unchanged, one_thread, snapshot

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is as fast, and ~100x faster per op on a CPU shared with
    other jobs (multi-threaded small ops then wait on each other's threads)."""
    with one_thread():
        yield


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _zoo_analysis(name, samples):
    s = subject(name)
    batches = list(s.dataset.calibration.subset(slice(0, samples)).batches(samples))
    return analyse(s.loaded.model, batches, device=CPU, input_shape=s.dataset.input_shape)


def _explicit_matrix(f, shape):
    """(outputs, inputs) matrix of a linear map, column j = f(basis vector j)."""
    n = torch.Size(shape).numel()
    basis = torch.eye(n).view(n, *shape)
    return f(basis).reshape(n, -1).T


# --- Lipschitz constants -------------------------------------------------------------------------

@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 4, 3, stride=1, padding=1), (3, 7, 6)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 6)),
    (lambda: nn.Conv2d(2, 3, 4, padding="same", dilation=2), (2, 6, 5)),   # asymmetric padding
    (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 0)), (2, 7, 5)),
], ids=["stride1-pad1", "stride2-pad1", "same-even-dilated", "asymmetric"])
def test_power_iteration_matches_the_explicit_operator_norm(float64, make, shape):
    torch.manual_seed(0)
    conv = make()
    with torch.no_grad():
        matrix = _explicit_matrix(lambda x: conv._conv_forward(x, conv.weight, None), shape)
    expected = float(torch.linalg.matrix_norm(matrix, ord=2))
    # Power iteration converges from below at rate (σ2/σ1)^2k; random convolutions can have σ2
    # within 3e-4 of σ1 (the first case does), so run it long enough to reach σ1 itself ...
    assert theory.conv_lipschitz(conv, shape, iterations=50_000, tol=1e-14) == pytest.approx(
        expected, rel=1e-6)
    # ... and the default is a lower estimate within 1e-3.
    estimate = theory.conv_lipschitz(conv, shape)
    assert expected * (1 - 1e-3) <= estimate <= expected * (1 + 1e-12)


def test_module_constants_are_upper_bounds(float64):
    torch.manual_seed(0)
    shape = (4, 9, 9)
    for module in (nn.MaxPool2d(3, stride=2), nn.AvgPool2d(3, stride=2), nn.AdaptiveAvgPool2d(2)):
        lip = theory.module_lipschitz(module, shape)
        x, y = torch.randn(64, *shape), torch.randn(64, *shape)
        gain = (module(x) - module(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        assert gain.max() <= lip * (1 + 1e-9)
    avg = nn.AvgPool2d(3, stride=2)  # linear: power iteration gives its exact norm
    expected = torch.linalg.matrix_norm(_explicit_matrix(avg, shape), ord=2)
    assert float(expected) * (1 - 1e-4) <= theory.module_lipschitz(avg, shape) <= float(expected)


def test_basic_block_constant_bounds_its_gain(float64):
    torch.manual_seed(0)
    block = nn.Sequential(nets.BasicBlock(4, 6, stride=2))
    recalibrate_batchnorm(block, [torch.randn(16, 4, 8, 8)])
    table = theory.lipschitz_table(block, input_shape=(4, 8, 8))
    # Lip(branch) + Lip(shortcut): the constant from the block's input to its output.
    constant = theory.bound_constants(nn.Sequential(nn.Identity(), block), ["0"],
                                      input_shape=(4, 8, 8)).bound_constant[0]
    branch = table.set_index("module").lipschitz
    expected = (branch["0.conv1"] * branch["0.bn1"] * branch["0.conv2"] * branch["0.bn2"]
                + branch["0.shortcut.0"] * branch["0.shortcut.1"])
    assert constant == pytest.approx(expected)
    x = torch.randn(256, 4, 8, 8)
    y = x + 0.1 * torch.randn_like(x)
    with torch.no_grad():
        gain = (block(x) - block(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert gain.max() <= constant


# --- local vs global error ---------------------------------------------------------------------

def test_local_error_is_the_sum_of_masked_quadratic_forms(float64):
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 4, 3, padding=1)
    fidelity = layer_fidelity(layer, torch.randn(16, 5, 6, 6) + 0.3)
    masks = (torch.rand(7, 5) < 0.5).double()
    local = theory.masked_local_error(fidelity, masks)
    for mask, value in zip(masks, local):
        u = 1 - mask
        expected = sum(u @ fidelity.Q(c) @ u for c in range(4))
        assert value == pytest.approx(float(expected), rel=1e-10)


def test_linear_network_global_error_is_the_propagated_local_error(float64):
    """No non-linearity after layer l: f_m(x) − f(x) = G(ΔY), computed by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(5, 4, 3, stride=2, padding=1),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).eval()
    x = torch.randn(40, 2, 6, 6)
    analysis = analyse(model, [x[:20], x[20:]], device=CPU, input_shape=(2, 6, 6))
    assert list(analysis.fidelity) == ["1"]
    result = theory.local_global(analysis, "1", kept=(0.2, 0.6), random_masks=3)
    conv, head = model[1], model[3]
    with torch.no_grad():
        X = model[0](x)  # (N, 5, 6, 6): the masked layer's input
        for row in result.table.itertuples():
            mask = torch.zeros(5).index_fill_(0, torch.tensor(row.kept_channels), 1.0)
            dY = F.conv2d(X * (1 - mask)[:, None, None], conv.weight, None, stride=2, padding=1)
            local = dY.square().sum((1, 2, 3)).mean()                            # E‖ΔY‖²
            propagated = (dY.flatten(1) @ head.weight.T).square().sum(1).mean()  # E‖G ΔY‖²
            assert row.local_error == pytest.approx(float(local), rel=1e-9)
            assert row.global_error == pytest.approx(float(propagated), rel=1e-9)
            assert row.global_error <= row.bound
    assert list(result.table.kind) == ["hifi"] * 2 + ["random"] * 6
    assert result.bound_kind == "composition"
    head_norm = torch.linalg.matrix_norm(head.weight.detach(), ord=2)  # C_l: Flatten, then Linear
    assert result.bound_constant == pytest.approx(float(head_norm))


def _brute_global(model, batches, layer, mask):
    """E‖f(x) − f_m(x)‖² with W[:, i] zeroed on a copy and full forward passes."""
    masked = copy.deepcopy(model)
    weight = masked.get_submodule(layer).weight
    with torch.no_grad():
        weight.mul_(mask.view(1, -1, *[1] * (weight.dim() - 2)))
        return sum(float((model(b) - masked(b)).double().square().sum()) for b in batches) / sum(
            len(b) for b in batches)


def test_replayed_prefix_gives_the_same_global_error_as_full_passes():
    torch.manual_seed(0)
    model = nets.ResNet(widths=(8, 16, 16)).eval()
    batches = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    recalibrate_batchnorm(model, batches)
    layers = ["layers.0.conv1", "layers.1.conv2", "layers.1.shortcut.0", "layers.2.conv1", "head.2"]
    replay = Replay(model, torch.cat(batches), layers, batch_size=16)
    assert set(replay.prefix("layers.1.conv2")) == {"stem", "layers.0", "layers.1.conv1",
                                                     "layers.1.bn1"}
    for layer in layers:
        c_in = model.get_submodule(layer).weight.shape[1]
        masks = theory.draw_masks(c_in, 0.5, 2, torch.Generator().manual_seed(1))
        measured = theory.global_errors(replay, layer, masks, batch_size=16)
        for mask, value in zip(masks, measured):
            expected = _brute_global(model, batches, layer, mask)
            assert float(value) == pytest.approx(expected, rel=1e-5)


def test_every_global_error_is_below_the_bound_on_digits_cnn():
    analysis = _zoo_analysis("digits-cnn", 300)
    for layer in analysis.fidelity:
        result = theory.local_global(analysis, layer, random_masks=3)
        table = result.table
        assert result.bound_kind == "composition"
        assert (table.global_error > 0).all() and (table.local_error > 0).all()
        assert (table.global_error <= table.bound * (1 + 1e-6)).all()
        assert result.worst_ratio == pytest.approx(table.ratio.max())
        assert 0 < result.fitted_ratio <= result.worst_ratio


def test_every_global_error_is_below_the_bound_on_fmnist_resnet():
    analysis = _zoo_analysis("fmnist-resnet", 64)
    model = analysis.model
    before = snapshot(model)
    errors = theory.layer_errors(analysis, masks=2)
    assert set(errors.layer) == set(analysis.fidelity)
    assert (errors.bound_kind == "composition").all()
    assert (errors.global_error <= errors.bound_constant**2 * errors.local_error * (1 + 1e-6)).all()
    # The head sees the logits directly: C = 1 and global = local.
    head = errors.set_index("layer").loc["head.2"]
    assert head.bound_constant == 1.0 and head.ratio == pytest.approx(1.0, rel=1e-5)
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


# --- the feature-extractor view ----------------------------------------------------------------

def test_invariance_table_and_zero_translation():
    s = subject("digits-cnn")
    images = next(s.dataset.calibration.batches(32))
    dense = s.loaded.model
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[3].weight[:, ::2] = 0  # any second model will do
    table = theory.invariance({"dense": dense, "pruned": pruned}, images, shifts=(0, 1, 2),
                              deformations=(0.0, 1.0))
    assert list(table.columns) == ["model", "layer", "depth", "transform", "amount",
                                   "relative_change", "lipschitz_bound"]
    assert set(table.model) == {"dense", "pruned"}
    shifted = table[table["transform"] == "translation"]  # (table.transform is a DataFrame method)
    assert list(shifted[(shifted.model == "dense") & (shifted.amount == 0)].layer) == [
        "input", "0", "3", "9"]
    assert (shifted[shifted.amount == 0].relative_change == 0).all()
    deformed = table[table["transform"] == "deformation"]
    assert (deformed[deformed.amount == 0].relative_change < 1e-5).all()
    moved = shifted[shifted.amount == 2]
    assert (moved.relative_change > 0).all()
    assert (table.lipschitz_bound > 0).all()
    assert not any(m._forward_hooks for m in dense.modules())


# --- HiFi existence -------------------------------------------------------------------------

def test_random_order_curves_are_subset_fidelities(float64):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 3, 3, padding=1)
    f = layer_fidelity(layer, torch.randn(32, 6, 5, 5) + 0.5, lam=0.0)
    scores = torch.rand(3, 6)
    curves = theory.RandomOrder(f.H, f.weight, f.lam, scores=scores).fidelity_curves()
    for c in range(3):
        order = scores[c].argsort(descending=True)
        for k in range(1, 7):
            assert curves[c, k - 1] == pytest.approx(f.subset_fidelity(c, order[:k]), abs=1e-8)


def test_top_k_is_never_worse_than_random_when_contributions_are_uncorrelated(float64):
    """Diagonal Q_c: the top-k singletons are the best subset of each size (method.md §1)."""
    torch.manual_seed(0)
    c_in = 24
    inputs = torch.linalg.qr(torch.randn(200, c_in)).Q * torch.linspace(0.5, 3, c_in)  # xᵢ ⟂ xⱼ
    f = layer_fidelity(nn.Linear(c_in, 6), inputs, lam=0.0)
    assert torch.allclose(f.Q(0), torch.diag(torch.diagonal(f.Q(0))), atol=1e-10)
    result = theory.hifi_existence({"fc": f}, trials=8, outputs=None)
    assert result.table.topk_not_worse[0] == 1.0
    generator = torch.Generator().manual_seed(0)
    search = theory.random_search(f, level=0.8, trials=8, generator=generator)
    assert (hifi_size(f) <= search).all()


def test_existence_on_digits_cnn_top_k_needs_no_more_than_random_search():
    s = subject("digits-cnn")
    analysis = _zoo_analysis("digits-cnn", 300)
    untrained = theory.untrained_analysis(ZOO["digits-cnn"].build, analysis)
    result = theory.hifi_existence(analysis.fidelity, untrained=untrained.fidelity)
    table = result.table
    assert list(table.model) == ["trained"] * 2 + ["untrained"] * 2
    assert table.topk_share.between(0, 1).all() and table.random_share.between(0, 1).all()
    conv = table[(table.model == "trained") & (table.layer == "3")].iloc[0]  # a feature-map layer
    assert conv.topk_share <= conv.random_share
    # One question, one number: the Theory page's top-k shares are the Fidelity page's.
    trained = table[table.model == "trained"]
    assert list(trained.topk_share) == list(hifi_table(analysis).hifi_share)
    assert result.share("trained") == float((hifi_table(analysis).hifi_share < HIFI_SHARE).mean())
    assert all(p.grad is None for p in s.loaded.model.parameters())


# --- the CLI's report ----------------------------------------------------------------------------

def test_theory_report_keys_and_json():
    s = subject("digits-cnn")
    report = theory.theory_report(s.loaded.model, s.dataset, device=CPU, name="digits-cnn",
                                  masks=2, build=ZOO["digits-cnn"].build)
    json.dumps(report, allow_nan=False)
    assert {"model", "layers", "max_ratio", "hifi_share", "hifi_share_untrained"} <= set(report)
    assert report["model"] == "digits-cnn" and report["calib_samples"] == 300
    assert {row["layer"] for row in report["layers"]} == {"3", "9"}
    for row in report["layers"]:
        assert {"layer", "local_error", "global_error", "ratio", "bound_constant"} <= set(row)
        assert row["global_error"] <= row["bound_constant"] ** 2 * row["local_error"] * (1 + 1e-6)
    assert report["max_ratio"] == max(row["ratio"] for row in report["layers"])
    assert 0 <= report["hifi_share"] <= 1


def test_bad_input_is_one_line_user_error():
    s = subject("digits-cnn")
    with pytest.raises(UserError, match="calibration samples"):
        theory.theory_report(s.loaded.model, s.dataset, device=CPU, calib_samples=10**6)
    analysis = _zoo_analysis("digits-cnn", 32)
    with pytest.raises(UserError, match="not a scored consumer layer"):
        theory.local_global(analysis, "nope")


def test_a_conv_norm_is_returned_though_another_thread_empties_the_cache(monkeypatch):
    """The memo is shared by every session's thread; one that empties it (past its size) between
    this call's store and read must not cost this call its result."""
    from modhifi.theory import lipschitz

    class Emptied(dict):  # another thread clears the memo right after each store
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            self.clear()

    monkeypatch.setattr(lipschitz, "_CONV_NORMS", Emptied())
    conv = nn.Conv2d(2, 3, 3, padding=1)
    norm = lipschitz.conv_lipschitz(conv, (2, 6, 6), iterations=50)
    assert norm > 0 and norm == lipschitz.conv_lipschitz(conv, (2, 6, 6), iterations=50)
