"""Oracles for modhifi.fidelity: every formula against explicit per-sample contributions A_ci."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oracles import contributions

from modhifi.fidelity import (PANEL, RIDGE_TRIES, LayerFidelity, greedy_subset, layer_fidelity,
                              ridge_solve)
from modhifi.moments import LayerMoments, collect_moments, moments_of, regression_moments

RTOL = 1e-8


def assert_rel(actual, expected, rtol=RTOL):
    """Max error within rtol of the largest expected magnitude (entries of Q can be ~0)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rtol * expected.abs().max()


def brute_subset(A, c, S):
    """FS_c(S) and δ* by least squares of Y_c on the kept contributions."""
    Y = A[:, c].sum(1).flatten()  # (N·L,)
    X = A[:, c, S].transpose(1, 2).reshape(-1, len(S))  # (N·L, |S|)
    coef = torch.linalg.lstsq(X, Y[:, None]).solution[:, 0]
    fidelity = 1 - (Y - X @ coef).square().sum() / Y.square().sum()
    delta = torch.zeros(A.shape[2], dtype=A.dtype)
    delta[S] = coef
    return fidelity, delta


CASES = {
    "conv1x1": (lambda: nn.Conv2d(4, 5, 1), (4, 6, 6)),
    "conv3x3-stride2-pad1": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (4, 7, 7)),
    "conv3x3-dilation2": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (3, 6, 6)),
    "conv-asymmetric": (
        lambda: nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
        (3, 7, 6),
    ),
    "conv-same-reflect": (lambda: nn.Conv2d(3, 4, 2, padding="same", padding_mode="reflect"), (3, 5, 5)),
    "linear": (lambda: nn.Linear(6, 5), (6,)),
    "linear-tokens": (lambda: nn.Linear(6, 5), (3, 6)),
}


@pytest.fixture(params=list(CASES))
def case(request):
    torch.manual_seed(0)
    make, shape = CASES[request.param]
    layer = make().double()  # bias=True: the scores must ignore it
    x = torch.randn(24, *shape, dtype=torch.float64) + 0.5  # a shared offset makes centring matter
    return layer, x


@pytest.mark.parametrize("centered", [False, True])
def test_scores_match_brute_force(case, centered):
    layer, x = case
    A = contributions(layer, x)
    if centered:
        A = A - A.mean(0)  # per-position means over the samples
    N = len(A)
    Y = A.sum(2)  # (N, c_out, L)
    Q = torch.einsum("ncip,ncjp->cij", A, A) / N
    energy = Y.square().sum((0, 2)) / N
    saliency = torch.einsum("ncp,ncip->ci", Y, A) / N
    own_energy = A.square().sum((0, 3)) / N  # (c_out, c_in)

    lf = layer_fidelity(layer, x, centered=centered, lam=0)

    for c in range(len(Q)):
        assert_rel(lf.Q(c), Q[c])
    assert_rel(lf.saliency, saliency)
    assert_rel(lf.energy, energy)
    assert_rel(lf.singleton, saliency**2 / (own_energy * energy[:, None]))
    generator = torch.Generator().manual_seed(1)
    for c in range(len(Q)):
        S = torch.randperm(Q.shape[1], generator=generator)[: Q.shape[1] // 2].sort().values
        fidelity, delta = brute_subset(A, c, S)
        assert lf.subset_fidelity(c, S) == pytest.approx(fidelity.item(), abs=RTOL)
        assert_rel(lf.compensation(c, S), delta)


def test_default_lam_stays_close_to_exact(case):
    layer, x = case
    exact, ridge = layer_fidelity(layer, x, lam=0), layer_fidelity(layer, x)
    # δ* can move a few percent where Q_c is ill-conditioned; the explained energy barely does.
    for S in ([0, 2], [1], [0, 1]):
        best = exact.subset_fidelity(1, S)
        assert best - 1e-3 <= ridge.subset_fidelity(1, S) <= best + 1e-12


def test_top_k_singletons_are_the_best_subsets_when_uncorrelated():
    torch.manual_seed(0)
    # Orthogonal input columns make the Gram matrix, hence every Q_c, exactly diagonal.
    x = torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64)).Q * torch.rand(6, dtype=torch.float64)
    lf = layer_fidelity(nn.Linear(6, 3).double(), x, lam=0)
    for c in range(3):
        Q = lf.Q(c)
        assert (Q - torch.diag(Q.diagonal())).abs().max() <= 1e-12 * Q.abs().max()
        hifi_order = lf.singleton[c].argsort(descending=True)
        for k in range(1, 7):
            best = max(lf.subset_fidelity(c, S) for S in itertools.combinations(range(6), k))
            assert lf.subset_fidelity(c, hifi_order[:k]) == pytest.approx(best, abs=1e-12)


def test_fidelity_is_bounded_and_monotone_over_nested_subsets(case):
    layer, x = case
    lf = layer_fidelity(layer, x, lam=0)
    c_out, c_in = lf.singleton.shape
    assert ((lf.singleton >= 0) & (lf.singleton <= 1)).all()
    generator = torch.Generator().manual_seed(2)
    for c in range(c_out):
        order = torch.randperm(c_in, generator=generator)
        fidelities = [lf.subset_fidelity(c, order[:k]) for k in range(c_in + 1)]
        assert fidelities[0] == pytest.approx(0, abs=1e-12)
        assert fidelities[-1] == pytest.approx(1, abs=1e-12)
        assert fidelities[1] == pytest.approx(lf.singleton[c, order[0]].item(), abs=1e-12)
        assert all(0 <= f <= 1 for f in fidelities)
        assert all(b >= a - 1e-12 for a, b in zip(fidelities, fidelities[1:]))


def test_dead_channels_score_zero_and_solve():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.weight[0] = 0  # a dead output channel
    x = torch.randn(10, 4, dtype=torch.float64)
    x[:, 1] = 0  # a dead input channel
    lf = layer_fidelity(layer, x, lam=0)
    assert (lf.singleton[0] == 0).all() and (lf.singleton[:, 1] == 0).all()
    assert lf.subset_fidelity(0, [0, 2]) == 0
    keep = torch.tensor([0, 1, 3])  # singular systems with lam=0: the pseudo-inverse path
    for weight in (lf.rescaled_weight(keep), lf.refit_weight(keep)):
        assert weight.isfinite().all()
        assert (lf.reconstruction_error(weight) <= lf.reconstruction_error(layer.weight * 0) + 1e-12).all()


def test_a_system_rounding_left_indefinite_gets_a_larger_ridge_not_an_svd(monkeypatch):
    """A PSD matrix with one eigenvalue pushed to −5·10⁻⁴ of its mean diagonal (what float32
    sums leave in a centred second moment) does not factorise at λ = 10⁻⁴: it is solved at 10λ,
    the first ridge tried that makes it positive definite, beside an untouched system solved at
    λ, and without an SVD; one that no ridge tried fixes gets the pseudo-inverse."""
    torch.manual_seed(0)
    n = 40
    U = torch.randn(n, 5, dtype=torch.float64)
    H = U @ U.T  # PSD of rank 5
    v = torch.randn(n, dtype=torch.float64)
    v = F.normalize(v - U @ torch.linalg.lstsq(U, v).solution, dim=0)  # in H's null space
    mean = float(H.diagonal().mean())
    bent, hopeless = (H - share * mean * torch.outer(v, v) for share in (5e-4, 0.2))
    B = torch.randn(n, 3, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)

    def ridged(A, ridge):
        return torch.linalg.solve(A + ridge * A.diagonal().mean() * eye, B)

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD where a larger ridge factorises")

    assert torch.linalg.cholesky_ex(bent + 1e-4 * bent.diagonal().mean() * eye)[1] != 0
    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "pinv", no_svd)
        X = ridge_solve(torch.stack([H, bent]), torch.stack([B, B]), 1e-4)
    for got, want in ((X[0], ridged(H, 1e-4)), (X[1], ridged(bent, 1e-3))):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7 * float(want.abs().max()))
    last = 1e-4 * 10.0 ** RIDGE_TRIES  # still indefinite: −0.2 + 0.1 of the mean diagonal
    torch.testing.assert_close(ridge_solve(hopeless, B, 1e-4), torch.linalg.pinv(
        hopeless + last * hopeless.diagonal().mean() * eye, hermitian=True) @ B)


def test_moments_of_halves_add_up_to_the_whole(case):
    layer, x = case
    whole, halves = moments_of(layer, x), moments_of(layer, x[:10]) + moments_of(layer, x[10:])
    assert halves.samples == whole.samples == len(x)
    assert_rel(halves.second, whole.second, rtol=1e-12)
    assert_rel(halves.position_sum, whole.position_sum, rtol=1e-12)
    assert_rel(halves.centered_second(), whole.centered_second(), rtol=1e-12)


def test_regression_moments_put_the_layers_own_outputs_beside_its_patches(case):
    """Targets T = the layer's output minus its bias, computed by torch's own layer: T = P Wᵀ,
    so the sums must be [[PᵀP, PᵀP Wᵀ], [W PᵀP, W PᵀP Wᵀ]] with PᵀP from `moments_of` (whose
    own oracle is above), which also checks that positions and channels line up."""
    layer, x = case
    conv = isinstance(layer, nn.Conv2d)
    with torch.no_grad():
        y = layer(x) - (layer.bias.view(-1, 1, 1) if conv else layer.bias)
    targets = y.flatten(2).transpose(1, 2) if conv else y.reshape(len(x), -1, y.shape[-1])
    got, patches = regression_moments(layer, x, targets), moments_of(layer, x)
    W = layer.weight.detach().reshape(len(layer.weight), -1).double()   # (c_out, d)
    d, H = W.shape[1], patches.second.double()
    assert_rel(got.second[:d, :d], H)
    assert_rel(got.second[:d, d:], H @ W.T)
    assert_rel(got.second[d:, d:], W @ H @ W.T)
    assert_rel(got.position_sum, torch.cat([patches.position_sum,
                                            patches.position_sum.double() @ W.T], -1))


@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (5, 6, 4)])
def test_pooled_centring_removes_one_mean_per_feature_over_samples_and_positions(shape):
    """Rows whose patches are the inputs themselves (a 1×1 convolution, a token layer)."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) + 3
    layer = nn.Conv2d(4, 2, 1) if len(shape) == 4 else nn.Linear(4, 2)
    rows = x.flatten(2).transpose(1, 2) if len(shape) == 4 else x    # (N, L, 4)
    flat = rows.reshape(-1, 4)
    centred = flat - flat.mean(0)
    assert_rel(moments_of(layer.double(), x).pooled_centered_second(),
               centred.T @ centred / len(x))


def test_layer_moments_is_a_plain_sum():
    moments = LayerMoments(torch.eye(2), torch.ones(1, 2), 4)
    total = moments + moments
    assert total.samples == 8 and torch.equal(total.second, 2 * torch.eye(2))
    assert torch.equal(total.centered_second(), torch.eye(2, dtype=torch.float64) / 4 - 1 / 16)


@pytest.mark.parametrize("lam", [0, 1e-4])
def test_refit_beats_rescale_beats_no_compensation(lam):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.randn(16, 6, 6, 6, dtype=torch.float64)
    lf = layer_fidelity(layer, x, lam=lam)
    W = layer.weight.detach()
    Y = layer(x).detach() - layer.bias.detach()[:, None, None]  # (N, c_out, H, W), bias ignored
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 6 * 9)  # (N·L, d)
    generator = torch.Generator().manual_seed(3)
    for size in (1, 2, 4):
        keep = torch.randperm(6, generator=generator)[:size].sort().values
        plain = torch.zeros_like(W)
        plain[:, keep] = W[:, keep]
        refit, rescaled = lf.refit_weight(keep), lf.rescaled_weight(keep)
        errors = [lf.reconstruction_error(w) for w in (refit, rescaled, plain)]
        assert (errors[0] <= errors[1] * (1 + 1e-10)).all()
        assert (errors[1] <= errors[2] * (1 + 1e-10)).all()

        # The local error is the measured E‖Y_c − Y'_c‖² of the conv with the new weight.
        measured = (F.conv2d(x, rescaled, padding=1) - Y).square().sum((2, 3)).mean(0)
        assert_rel(errors[1], measured)
        for c in range(5):
            assert_rel(rescaled[c, keep], W[c, keep] * lf.compensation(c, keep)[keep, None, None])
        removed = torch.ones(6, dtype=torch.bool)
        removed[keep] = False
        assert not refit[:, removed].any() and not rescaled[:, removed].any()
        if lam == 0:
            # Refit is least squares of every output on the kept channels' patches.
            C = (keep[:, None] * 9 + torch.arange(9)).flatten()
            targets = Y.permute(0, 2, 3, 1).reshape(-1, 5)  # (N·L, c_out)
            solution = torch.linalg.lstsq(patches[:, C], targets).solution  # (|C|, c_out)
            assert_rel(refit[:, keep].reshape(5, -1), solution.T)


def test_weights_keep_dtype_and_can_become_parameters():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3)
    lf = layer_fidelity(layer, torch.randn(8, 3, 5, 5))
    for weight in (lf.rescaled_weight(torch.tensor([0, 2])), lf.refit_weight(torch.tensor([1]))):
        assert weight.dtype == torch.float32 and weight.shape == layer.weight.shape
        nn.Parameter(weight)


def test_collect_moments_matches_moments_of_the_captured_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(80, 3)
    ).eval()
    x = torch.randn(12, 3, 6, 6)
    moments = collect_moments(model, ["0", "2", "4"], x.split(5), device="cpu")
    captured = {"0": x, "2": model[:2](x).detach(), "4": model[:4](x).detach()}
    for name, inputs in captured.items():
        expected = moments_of(model.get_submodule(name), inputs)
        assert moments[name].samples == 12
        assert_rel(moments[name].second, expected.second, rtol=1e-5)
        assert_rel(moments[name].position_sum, expected.position_sum, rtol=1e-5)
    by_module = collect_moments(model, {"conv": model[2]}, [x], device="cpu")
    assert_rel(by_module["conv"].second, moments["2"].second, rtol=1e-5)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not layer._forward_pre_hooks for layer in model)


def test_collect_moments_removes_hooks_when_a_batch_fails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError):
        collect_moments(model, ["0"], [torch.randn(2, 3, 5, 5), torch.randn(2, 5)], device="cpu")
    assert not model[0]._forward_pre_hooks


@pytest.mark.parametrize(
    ("layer", "inputs", "problem"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), torch.randn(2, 4, 5, 5), "groups=2"),
        (nn.Conv2d(3, 4, 3), torch.randn(2, 5, 5, 5), "shape"),
        (nn.Conv2d(3, 4, 3), torch.randn(3, 5, 5), "shape"),
        (nn.Linear(6, 2), torch.randn(2, 3, 5), "shape"),
        (nn.ReLU(), torch.randn(2, 3), "ReLU"),
    ],
)
def test_unsupported_layers_and_shapes_raise_a_clear_value_error(layer, inputs, problem):
    with pytest.raises(ValueError, match=problem) as error:
        moments_of(layer, inputs)
    assert "\n" not in str(error.value)


def test_fidelity_curves_equal_subset_fidelity_of_each_top_k():
    torch.manual_seed(3)
    layer = nn.Conv2d(5, 4, 3, padding=1).double()
    lf = layer_fidelity(layer, torch.randn(16, 5, 6, 6, dtype=torch.float64), lam=0.0)
    curves = lf.fidelity_curves()
    assert curves.shape == (4, 5)
    for c in range(4):
        order = lf.singleton[c].argsort(descending=True)
        for k in range(1, 6):
            assert curves[c, k - 1].item() == pytest.approx(lf.subset_fidelity(c, order[:k]), abs=1e-8)
    assert torch.all(curves.diff(dim=1) >= -1e-12) and torch.allclose(curves[:, -1], torch.ones(4, dtype=torch.float64))


def _refit_span(layer, x, channel):
    """(N·L, K) the outputs input `channel` can produce through any one kernel slice: one column per
    tap, each the layer run with a one-hot weight (independent of how the implementation unfolds)."""
    probe = copy.deepcopy(layer)
    probe.bias = None
    taps = probe.weight[0, channel].numel()
    columns = []
    for tap in range(taps):
        with torch.no_grad():
            probe.weight.zero_()
            probe.weight[0, channel].view(-1)[tap] = 1
            y = probe(x)  # (N, c_out, H', W') or (N, [T,] c_out)
        columns.append((y[:, 0] if isinstance(layer, nn.Conv2d) else y[..., 0]).flatten())
    return torch.stack(columns, 1)


def _summed_refit_fidelity(layer, x, kept):
    """Σ_c FS_c(kept) under full refit: least squares of each output on the kept channels' spans."""
    with torch.no_grad():
        outputs = contributions(layer, x).sum(2)  # (N, c_out, L): the bias-free output
    Y = outputs.transpose(1, 2).reshape(-1, outputs.shape[1])  # (N·L, c_out)
    if not kept:
        return 0.0
    X = torch.cat([_refit_span(layer, x, i) for i in kept], 1)
    residual = Y - X @ torch.linalg.lstsq(X, Y).solution
    return float((1 - residual.square().sum(0) / Y.square().sum(0)).sum())


# Beside CASES' layers: fewer outputs (3); two more input channels and more outputs than inputs
# (c_out > d = c_in·k², where the greedy keeps b's row space instead of b).
FEWER = {"conv3x3-stride2-pad1": lambda: nn.Conv2d(4, 3, 3, stride=2, padding=1),
         "linear-tokens": lambda: nn.Linear(6, 3)}
WIDER = {"conv3x3-stride2-pad1": lambda: nn.Conv2d(6, 60, 3, stride=2, padding=1),
         "linear-tokens": lambda: nn.Linear(8, 11)}


@pytest.mark.parametrize("panel", [1, 5, PANEL])  # complements updated every 1 or 5 columns, or never
@pytest.mark.parametrize("name", ["conv3x3-stride2-pad1", "linear-tokens"])
def test_greedy_subset_adds_the_best_component_each_step_and_its_gains_are_exact(name, panel):
    torch.manual_seed(0)
    make, shape = CASES[name]
    x = torch.randn(24, *shape, dtype=torch.float64) + 0.5
    x = x + 0.8 * x.roll(1, dims=1 if len(shape) == 3 else -1)  # correlated channels
    axis = 1 if len(shape) == 3 else -1
    c_in = x.shape[axis]
    # Three consumers of the same components: the second has fewer outputs and reads component
    # g as its channel perm[g], the third reads two other channels first (a concatenation).
    perm = torch.randperm(c_in).tolist()
    x_perm = torch.empty_like(x)
    x_perm.index_copy_(axis % x.dim(), torch.tensor(perm), x)
    x_wide = torch.cat([torch.randn_like(x.narrow(axis, 0, 2)), x], axis)
    consumers = [(make().double(), x, list(range(c_in))), (FEWER[name]().double(), x_perm, perm),
                 (WIDER[name]().double(), x_wide, [g + 2 for g in range(c_in)])]

    def brute(components):
        return sum(_summed_refit_fidelity(layer, inputs, [index[g] for g in components])
                   for layer, inputs, index in consumers)

    order, gains = greedy_subset([(layer_fidelity(layer, inputs, lam=0), index)
                                  for layer, inputs, index in consumers], c_in, panel=panel)
    assert sorted(order) == list(range(c_in))
    for k in range(1, c_in + 1):
        assert sum(gains[:k]) == pytest.approx(brute(order[:k]), rel=1e-8)
        best = max(brute(order[:k - 1] + [j]) for j in range(c_in) if j not in order[:k - 1])
        assert brute(order[:k]) == pytest.approx(best, rel=1e-8)


@pytest.mark.parametrize("panel", [1, 2, PANEL])
def test_greedy_subset_is_exact_after_one_consumer_is_explained(panel, monkeypatch):
    """A consumer that saw 3 samples is fully explained by 3 channels and then left out of the
    steps; the other consumer's choices and gains stay the brute-force optimum."""
    from modhifi.fidelity import _Complement

    torch.manual_seed(0)
    few, many = torch.randn(3, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    consumers = [(nn.Linear(6, 4).double(), few), (nn.Linear(6, 9).double(), many)]

    def brute(kept):
        return sum(_summed_refit_fidelity(layer, x, kept) for layer, x in consumers)

    steps, take = [], _Complement.take
    monkeypatch.setattr(_Complement, "take", lambda self, component: (
        steps.append(self.Z.shape[1]), take(self, component))[1])  # Z: 4 or 6 columns (QR)
    order, gains = greedy_subset([(layer_fidelity(layer, x, lam=0), range(6))
                                  for layer, x in consumers], 6, panel=panel)
    assert steps.count(6) == 6 and steps.count(4) == 3  # the first left after 3 channels
    for k in range(1, 7):
        assert sum(gains[:k]) == pytest.approx(brute(order[:k]), rel=1e-8)
        best = max(brute(order[:k - 1] + [j]) for j in range(6) if j not in order[:k - 1])
        assert brute(order[:k]) == pytest.approx(best, rel=1e-8)


def test_greedy_subset_ranks_a_duplicate_and_a_dead_channel_last():
    """The union of singleton HiFi sets would keep both twins; greedy sees the second adds nothing."""
    torch.manual_seed(0)
    x = torch.randn(200, 5, dtype=torch.float64)
    x = torch.cat([x, x[:, :1], torch.zeros(200, 1, dtype=torch.float64)], 1)  # 5 = twin of 0, 6 dead
    lf = layer_fidelity(nn.Linear(7, 4).double(), x, lam=0)
    order, gains = greedy_subset([(lf, range(7))], 7)
    later_twin = 5 if order.index(0) < order.index(5) else 0
    assert set(order[-2:]) == {later_twin, 6}
    assert gains[-2:] == pytest.approx([0, 0], abs=1e-9)
    assert sum(gains) == pytest.approx(4)  # all kept: each of the 4 outputs is fully explained


def test_greedy_subset_orders_inputs_that_never_vary():
    """Centred statistics of inputs that are the same for every sample (a layer deep in a
    network that ignores its input) are rounding: a zero or negative diagonal, a negative mean.
    Greedy still orders every component (it divided by a zero block before)."""
    torch.manual_seed(0)
    H = torch.diag(torch.tensor([-1e-9, 0.0, 0.0, 1e-10], dtype=torch.float64))
    fidelity = LayerFidelity(H, torch.randn(3, 4, dtype=torch.float64), lam=1e-4)
    order, gains = greedy_subset([(fidelity, range(4))], 4)
    assert sorted(order) == [0, 1, 2, 3] and all(math.isfinite(g) for g in gains)


def test_a_centred_fidelity_gives_back_the_uncentred_statistics():
    """What the activation baseline and the theory's bound read (E[Σ P²], E[Σ PᵀP]) from a
    fidelity that subtracted the means, against explicit patches."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3)
    x = torch.randn(16, 3, 6, 6).double() + 2  # means well away from zero
    patches = F.unfold(x, 3)  # (N, d, L) explicit
    second = torch.einsum("ndl,nel->de", patches, patches) / len(x)  # E[Σ_l P_l P_lᵀ]
    moments = moments_of(layer.double(), x)
    centred = LayerFidelity.from_moments(layer.weight, moments, centered=True)
    plain = LayerFidelity.from_moments(layer.weight, moments)
    assert not torch.allclose(centred.H, second)
    torch.testing.assert_close(centred.uncentred().H, second)
    torch.testing.assert_close(centred.mean_square(), second.diagonal())
    torch.testing.assert_close(centred.means, patches.mean(0).T)  # (L, d)
    assert plain.uncentred() is plain and plain.means is None
    torch.testing.assert_close(plain.mean_square(), second.diagonal())
