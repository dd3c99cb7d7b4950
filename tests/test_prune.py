"""ModHiFi-P: plans are exact, surgery is real, the input model is untouched, compensation helps."""
import json

import pytest
import torch
from torch import nn

from modhifi import nets
from modhifi.metrics import count_cost
from modhifi.errors import UserError
from modhifi.options import METHOD_LABELS, Method, choices
from modhifi.prune import (IMPORTANCES, Evidence, analyse, cut_channels, kept_inputs, rank,
                           recalibrate_batchnorm, trace_structure)
from modhifi.zoo import build_torchvision
from oracles import PRUNE_KEYS, assert_unchanged, cache_synthetic_costs, command_line, snapshot


def _analysis(model, shape, samples=64, seed=0):
    torch.manual_seed(seed)
    batches = [torch.randn(32, *shape) for _ in range(samples // 32)]
    model.eval()
    recalibrate_batchnorm(model, batches)  # give random networks sensible BN statistics
    return analyse(model, batches, device=torch.device("cpu"), input_shape=shape)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("target_kind, target", [("channels", 0.3), ("macs", 0.5), ("macs", 0.7)])
def test_plan_costs_are_exact_and_the_input_model_is_untouched(allocation, target_kind, target):
    model = nets.ResNet()
    analysis = _analysis(model, (1, 28, 28))
    before = snapshot(model)
    plan = analysis.plan(target, target_kind=target_kind, allocation=allocation)
    pruned = analysis.apply(plan, compensation="refit")
    cost = count_cost(pruned, (1, 28, 28))
    assert (cost.macs, cost.params) == (plan.macs_after, plan.params_after)
    removed = 1 - (plan.channels_after / plan.channels_before if target_kind == "channels"
                   else plan.macs_after / plan.macs_before)
    assert removed >= target
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert_unchanged(model, before)
    assert all(p.grad is None for p in [*model.parameters(), *pruned.parameters()])


@pytest.mark.parametrize("compensation", ["refit", "sequential", "rescale", "none"])
def test_a_plan_that_removes_nothing_gives_the_model_as_it_is(compensation):
    """Target 0: the same outputs, not BatchNorm statistics estimated again from calibration
    images other than the ones the model was trained on."""
    model = nets.ResNet().eval()
    torch.manual_seed(0)
    recalibrate_batchnorm(model, [torch.randn(32, 1, 28, 28) + 0.5])  # "training" statistics
    calibration = [torch.randn(32, 1, 28, 28) for _ in range(2)]
    analysis = analyse(model, calibration, device=torch.device("cpu"), input_shape=(1, 28, 28))
    plan = analysis.plan(0.0)
    assert plan.channels_after == plan.channels_before
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(analysis.apply(plan, compensation=compensation)(images), model(images))


def test_frozen_weights_are_pruned_like_trainable_ones_and_stay_frozen():
    """Torch-Pruning traces autograd: a weight that requires no gradient would leave its layers
    out of every group. The same groups and plan either way; the pruned model keeps each
    weight's flag, and the input model's flags are its own."""
    def resnet():
        torch.manual_seed(3)
        return nets.ResNet()

    trainable = _analysis(resnet(), (1, 28, 28))
    model = resnet()
    model.stem.requires_grad_(False)  # a partly frozen model (as for transfer learning)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    analysis = _analysis(model, (1, 28, 28))
    assert analysis.structure.groups == trainable.structure.groups
    plan = analysis.plan(0.5)
    assert plan.removed_channels() == trainable.plan(0.5).removed_channels()
    pruned = analysis.apply(plan)
    assert {name for name, p in pruned.named_parameters() if not p.requires_grad} == frozen
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen
    whole = trace_structure(model.requires_grad_(False), (1, 28, 28))
    assert whole.groups == trainable.structure.groups


def test_resnet_groups_couple_residual_channels():
    groups = {g.name: g for g in trace_structure(nets.ResNet(), (1, 28, 28)).groups}
    # Each block's inner channels, and one residual stream per stage (stem + both convs + shortcut).
    assert {"layers.0.conv1", "layers.1.conv1", "layers.2.conv1"} <= set(groups)
    stream = groups["stem.0"]
    assert set(stream.producers) == {"stem.0", "layers.0.conv2"}
    assert {name for name, _ in stream.consumers} == {"layers.0.conv1", "layers.1.conv1",
                                                      "layers.1.shortcut.0"}


@pytest.mark.parametrize("target_kind", ["channels", "macs"])
def test_internal_scope_leaves_residual_streams_whole(target_kind):
    model = nets.ResNet()
    analysis = _analysis(model, (1, 28, 28))
    plan = analysis.plan(0.4, target_kind=target_kind, scope="internal")
    assert {g.name for g in plan.groups} == {"layers.0.conv1", "layers.1.conv1", "layers.2.conv1"}
    pruned = analysis.apply(plan)
    assert (count_cost(pruned, (1, 28, 28)).macs, count_cost(pruned, (1, 28, 28)).params) == (
        plan.macs_after, plan.params_after)
    # Stream widths (the stem's and the shortcuts' outputs) are unchanged.
    assert [pruned.get_submodule(n).out_channels for n in ("stem.0", "layers.1.shortcut.0",
                                                           "layers.2.shortcut.0")] == [32, 64, 128]
    if target_kind == "channels":
        assert 1 - plan.channels_after / plan.channels_before >= 0.4


def test_vit_prunes_only_ffn_hidden_neurons():
    structure = trace_structure(nets.ViT(), (1, 28, 28))
    assert sorted(g.name for g in structure.groups) == [f"blocks.{i}.ffn.fc1" for i in range(4)]
    assert all(g.consumers[0][0].endswith("ffn.fc2") for g in structure.groups)


@pytest.mark.slow
@pytest.mark.parametrize("arch, shape", [("resnet18", (3, 64, 64)), ("resnet50", (3, 64, 64)),
                                         ("mobilenet_v2", (3, 64, 64))])
def test_torchvision_architectures_prune_to_the_planned_cost(arch, shape):
    model = build_torchvision(arch, num_classes=10)
    analysis = _analysis(model, shape, samples=32)
    # The cost and the surgery are under test: the union rule ranks ResNet-50 6 s faster.
    plan = analysis.plan(0.4, target_kind="macs", allocation="global", method="modhifi")
    pruned = analysis.apply(plan, compensation="refit")
    cost = count_cost(pruned, shape)
    assert (cost.macs, cost.params) == (plan.macs_after, plan.params_after)
    assert plan.macs_after <= 0.6 * plan.macs_before
    assert pruned(torch.randn(2, *shape)).shape == (2, 10)


def test_refit_beats_rescale_beats_no_compensation_on_every_layer():
    model = nets.ResNet(widths=(8, 16, 32))
    analysis = _analysis(model, (1, 16, 16), samples=128)
    plan = analysis.plan(0.5, target_kind="channels")
    kept = kept_inputs(analysis.structure, analysis.model, plan.removed_channels())
    assert kept
    for name, keep in kept.items():
        lf = analysis.fidelity[name]
        none = lf.weight.clone()
        none[:, [i for i in range(lf.w.shape[1]) if i not in keep.tolist()]] = 0
        errors = [lf.reconstruction_error(w) for w in (lf.refit_weight(keep),
                                                        lf.rescaled_weight(keep), none)]
        assert torch.all(errors[0] <= errors[1] * (1 + 1e-6) + 1e-12), name
        assert torch.all(errors[1] <= errors[2] * (1 + 1e-6) + 1e-12), name


def _inputs(network, name, batches):
    """The whole input of layer `name` over `batches`, captured by a hook."""
    seen = []
    handle = network.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            network(batch)
    handle.remove()
    return torch.cat(seen)


def _patches(layer, x):
    """(N·L, d) the rows a layer multiplies by its weight: F.unfold's patches, channel-major."""
    import torch.nn.functional as F

    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _sequential_oracle(dense, structure, plan, batches, recalibrating=True):
    """The sequential refit written out: in forward order, BatchNorm re-estimated by torch's own
    cumulative average, each consumer's pruned and dense inputs captured whole, unfolded by
    F.unfold, centred over samples and positions where a BatchNorm follows, and fitted by
    torch.linalg.lstsq; then BatchNorm re-estimated once more. The removed inputs are zeroed,
    not cut (a masked dense model). Not `recalibrating`: no re-estimation and no centring."""
    import copy

    model, dense = copy.deepcopy(dense).eval(), copy.deepcopy(dense).eval()  # hooked below
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def recalibrate():
        if not recalibrating:
            return
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # the cumulative average of the batches' statistics
            norm.train()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        model.eval()

    removed = {}
    for group in plan.groups:
        for name, index in structure.group(group.name).consumers:
            removed.setdefault(name, set()).update(index[i] for i in group.removed)
    for name in [n for n in structure.consumers if removed.get(n)]:
        recalibrate()
        layer = model.get_submodule(name)
        W = layer.weight.detach().reshape(len(layer.weight), -1)       # (c_out, d)
        K = W.shape[1] // layer.weight.shape[1]
        keep = [i for i in range(layer.weight.shape[1]) if i not in removed[name]]
        C = [i * K + j for i in keep for j in range(K)]
        Q = _patches(layer, _inputs(model, name, batches))[:, C]        # (N·L, |C|) pruned
        P = _patches(layer, _inputs(dense, name, batches))              # (N·L, d) dense
        if recalibrating and name in structure.followed_by_norm:
            Q, P = Q - Q.mean(0), P - P.mean(0)
        new = torch.zeros_like(W)
        new[:, C] = torch.linalg.lstsq(Q, P @ W.T).solution.T
        with torch.no_grad():
            layer.weight.copy_(new.reshape(layer.weight.shape))
    recalibrate()
    return model


class _ReadTwice(nn.Module):
    """A consumer called twice per pass (`head`), with an in-place ReLU on its first output."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        features = torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3))  # (N, 16)
        first = torch.relu_(self.head(features))
        return first + self.head(torch.tanh(features))


@pytest.mark.parametrize("make", [lambda: nets.ResNet(widths=(8, 16, 32)),  # BatchNorm, residuals
                                  lambda: nets.ViT(image_size=16, dim=16, depth=2, heads=2,
                                                   hidden=32),  # token inputs (N, T, c)
                                  _ReadTwice],
                         ids=["resnet", "vit", "read-twice"])
def test_the_sequential_refit_is_least_squares_on_the_pruned_networks_own_inputs(make):
    torch.manual_seed(0)
    model = make().double().eval()
    batches = [torch.randn(32, 1, 16, 16, dtype=torch.float64) for _ in range(4)]
    recalibrate_batchnorm(model, batches)  # sensible BatchNorm statistics for a random network
    before = snapshot(model)
    analysis = analyse(model, batches, device=torch.device("cpu"), lam=0)
    kept_before = snapshot(analysis.model)
    plan = analysis.plan(0.5, target_kind="channels", method="modhifi", round_to=1)
    pruned = analysis.apply(plan, compensation="sequential")
    oracle = _sequential_oracle(analysis.model, analysis.structure, plan, batches)
    one_shot = analysis.apply(plan, compensation="refit")
    probe = torch.randn(16, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected, got, one_shot = oracle(probe), pruned(probe), one_shot(probe)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    assert (one_shot - expected).abs().max() > 1e-3  # the two refits differ: the test can tell
    assert_unchanged(model, before)
    assert_unchanged(analysis.model, kept_before)


class _Doubling(nn.Module):
    """An output the parent doubles in place and reads twice, once after an in-place ReLU
    module wrote over it; a zero classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block, self.norm, self.act = nets.BasicBlock(8, 8), nn.BatchNorm2d(8), nn.ReLU(True)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        nn.init.zeros_(self.head[2].weight)  # the logits no longer show what the layers read
        nn.init.normal_(self.norm.bias)  # values of both signs for the in-place ReLU

    def forward(self, x):
        y = self.norm(self.block(self.stem(x)))
        y.mul_(2)  # in place, on an output the frontier records and replays twice
        z = torch.relu(self.conv1(self.act(y)) + y)  # the in-place ReLU changed y too
        return self.head(torch.relu(self.conv2(z) + y))


class _Flattened(nn.Module):
    """Tokens flattened into the batch axis, to the logits (rows that are not the samples); a
    zero classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(8, 8))  # replayed whole: its layer does not run
        self.mid, self.out = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)
        nn.init.zeros_(self.head.weight)

    def forward(self, x):  # (N, 1, 8, 8): 8 tokens of 8 features
        tokens = self.embed(x.reshape(len(x), 8, 8)).reshape(-1, 8)  # (N·8, 8)
        return self.head(self.out(torch.relu(self.mid(tokens))) + tokens)  # (N·8, 10)


class _Chained(nn.Module):
    """Two in-place modules one after the other over a norm's output, which the next layer
    reads through the norm's own reference; a zero classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.act1, self.act2 = nn.ReLU(True), nn.Hardtanh(0.0, 0.5, True)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        nn.init.zeros_(self.head[2].weight)
        nn.init.normal_(self.stem[1].bias)  # values of both signs and above 0.5

    def forward(self, x):
        y = self.stem(x)
        self.act2(self.act1(y))  # both write over y, whose outputs nothing else reads
        return self.head(self.conv2(self.conv1(y)))


@pytest.mark.parametrize("make", [_Doubling, _Flattened, _Chained],
                         ids=["in-place", "flattened", "chained"])
@pytest.mark.parametrize("max_bytes", [2**30, 0], ids=["replayed", "over-budget"])
def test_frontier_passes_see_what_whole_passes_see_while_layers_change_in_order(max_bytes, make):
    """Each pass up to a layer gives the layer the input a whole forward pass gives it, after
    every earlier layer was edited; with room to record, the first layer runs only on the first
    two passes."""
    _check_frontier_passes(make, max_bytes)


def test_a_frontier_runs_from_the_input_where_a_recording_it_dropped_is_read_again():
    """What the rest of the network reads only shrinks from one layer to the next, but where
    the read test says otherwise (its joint run can find every module read), a recording
    dropped as unread is not replayed as zeros: that pass runs from the input."""
    from modhifi.replay import Replay, prefix_modules
    from modhifi.trace import forward_order

    model = _Doubling().double().eval()
    example = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    layers = forward_order(model, example)
    replay = Replay(model, example, layers, batch_size=1)
    unread = {layer: replay.unread(layer) for layer in layers}
    first, second = layers[1], layers[2]
    again = set(prefix_modules(replay.trace, first)) & replay.read(second)
    assert again  # read at both layers; said unread at the first below
    unread[first] = unread[first] | again
    _check_frontier_passes(_Doubling, 2**30, unread=unread, replays=False)


def _check_frontier_passes(make, max_bytes: int, *, unread=None, replays: bool = True) -> None:
    """The input a frontier's passes give each layer of `make()` is the one a whole forward
    pass gives it, the layers edited in order (`unread`: as `Replay.unread` finds, unless
    given); where it `replays` with room to record, the first layer runs on two passes only."""
    from modhifi.hooks import private_copy
    from modhifi.replay import Frontier, Replay
    from modhifi.trace import forward_order

    torch.manual_seed(0)
    model = make().double().eval()
    chunks = [torch.randn(n, 1, 8, 8, dtype=torch.float64) for n in (5, 5, 3)]
    layers = forward_order(model, chunks[0][:1])
    replay = Replay(model, chunks[0][:1], layers, batch_size=1)
    unread = unread or {layer: replay.unread(layer) for layer in layers}
    edited = private_copy(model)
    frontier = Frontier(edited, chunks, replay.trace, unread, max_bytes=max_bytes)
    first_calls = []
    edited.get_submodule(layers[0]).register_forward_hook(lambda *args: first_calls.append(1))

    def inputs_of(layer, passes):
        seen = []
        handle = edited.get_submodule(layer).register_forward_pre_hook(
            lambda module, args: seen.append(args[0].clone()))
        with torch.no_grad():
            for chunk in passes:
                edited(chunk)
        handle.remove()
        return seen

    for layer in layers:
        expected = inputs_of(layer, chunks)
        first_calls.clear()
        got = inputs_of(layer, frontier.passes(layer))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        # the pass to the first layer records nothing before it; the next records the layer
        if replays:
            assert len(first_calls) == (len(chunks) if layer in layers[:2] or max_bytes == 0
                                        else 0)
        with torch.no_grad():
            edited.get_submodule(layer).weight.mul_(-0.5)  # the layer settles after its pass
    assert frontier.settled or max_bytes == 0


@pytest.mark.parametrize("make, shape", [
    (lambda: build_torchvision("resnet18", num_classes=10), (3, 32, 32)),  # in-place ReLUs
    (lambda: nets.ResNet(widths=(8, 16, 32)), (1, 16, 16))], ids=["torchvision", "ours"])
def test_the_recordings_foreseen_are_what_the_frontiers_keep_at_their_largest(monkeypatch, make,
                                                                              shape):
    """`sequential_recordings` foresees the most a frontier records over the whole refit: with
    that budget every pass after the first settles what it reached; a byte less, and some pass
    records nothing (the next runs from the input). Where each consumer's own input is over the
    budget already, the verdict comes without the read test."""
    from modhifi.hooks import private_copy
    from modhifi.prune import apply as prune_apply
    from modhifi.prune import sequential_recordings
    from modhifi.replay import Frontier, Replay

    torch.manual_seed(0)
    model = make().eval()
    chunks = [torch.randn(n, *shape) for n in (3, 2, 1)]  # 6 inputs, in chunks of unequal size
    order = trace_structure(model, shape).consumers
    foreseen = sequential_recordings(model, chunks[0][:1], order, samples=6)
    # the oracle: what the rest of the network reads, and the in-place ReLUs that wrote over
    # an output the rest reads (torchvision's ResNet: each ReLU's first call, over `bn1`'s)
    replay = Replay(model, chunks[0][:1], order, batch_size=1)
    over = {name: name.replace("relu", "bn1") for name, m in model.named_modules()
            if getattr(m, "inplace", False)}

    def kept(name: str, layer: str) -> bool:
        return name in replay.read(layer) or over.get(name) in replay.read(layer)

    assert foreseen.fits
    assert foreseen.nbytes == 6 * max(sum(replay.recorded(name).nbytes
                                         for name in replay.prefix(layer) if kept(name, layer))
                                     for layer in order)

    def settled(max_bytes: int) -> list[bool]:
        """Whether each pass after the first (which reaches nothing) settled what it reached."""
        copy = private_copy(model)
        frontier = Frontier(copy, chunks, replay.trace,
                            {layer: replay.unread(layer) for layer in order}, max_bytes=max_bytes)
        done = []
        with torch.no_grad():
            for layer in order:
                for chunk in frontier.passes(layer):
                    copy(chunk)
                done.append(bool(frontier.settled))
        return done[1:]

    assert all(settled(foreseen.nbytes))
    assert not all(settled(foreseen.nbytes - 1))

    def no_test(*args, **kwargs):
        raise AssertionError("the read test ran")

    monkeypatch.setattr(prune_apply, "FRONTIER_BYTES", foreseen.nbytes // 8)
    monkeypatch.setattr(prune_apply, "Replay", no_test)
    # the largest consumer input here is at least an eighth of the largest recording
    least = sequential_recordings(model, chunks[0][:1], order, samples=6)
    assert not least.fits and foreseen.nbytes // 8 < least.nbytes <= foreseen.nbytes


@pytest.mark.parametrize("budget, asked, used, said", [
    (None, None, "sequential", ""),
    (0, None, "refit", "modhifi: compensation: the one-shot refit (the sequential refit would "
                       "record at least"),
    (0, "sequential", "sequential", "modhifi: warning: the sequential refit would record at")])
def test_the_cli_refits_in_order_by_default_where_its_recordings_fit(monkeypatch, capsys, budget,
                                                                     asked, used, said):
    """The command line's default compensation for ModHiFi is the sequential refit where its
    recordings fit the budget, else the one-shot refit, saying so; asked for, it runs anyway."""
    from modhifi.prune import apply as prune_apply

    if budget is not None:
        monkeypatch.setattr(prune_apply, "FRONTIER_BYTES", budget)
    chosen = ["--compensation", asked] if asked else []
    compensation, err = _cli_compensation(capsys, 200, *chosen)
    assert compensation == used
    assert said in err and (said or "the sequential refit would" not in err)


def _cli_compensation(capsys, samples: int, *args: str) -> tuple[str, str]:
    """`prune` of digits-cnn on `samples` calibration images: the compensation its JSON says
    it used, and what it printed on stderr."""
    from modhifi.__main__ import main

    assert main(["prune", "--model", "digits-cnn", "--target", "0.3", "--device", "cpu",
                 "--calib-samples", str(samples), "--json", *args]) == 0
    out, err = capsys.readouterr()
    return json.loads(out)["compensation"], err


def test_the_cli_says_how_many_calibration_images_the_sequential_refit_takes(monkeypatch,
                                                                            capsys):
    """Over the budget, the message gives the most calibration images whose recordings fit;
    with that many, the command line refits in order."""
    from modhifi.prune import apply as prune_apply
    from modhifi.prune import sequential_recordings
    from modhifi.zoo import open_subject

    subject = open_subject("digits-cnn", device=torch.device("cpu"))
    model, shape = subject.loaded.model, subject.dataset.input_shape
    per_image = sequential_recordings(model, torch.zeros(1, *shape),
                                      trace_structure(model, shape).consumers, 1).nbytes
    monkeypatch.setattr(prune_apply, "FRONTIER_BYTES", 100 * per_image + per_image // 2)

    used, said = _cli_compensation(capsys, 200)
    assert used == "refit" and "--calib-samples 100 or fewer might fit" in said
    assert _cli_compensation(capsys, 100)[0] == "sequential"
    assert _cli_compensation(capsys, 101)[0] == "refit"


def test_the_default_compensation_is_judged_on_every_process_s_images(monkeypatch):
    """Under torchrun each process holds a share of the calibration images: the default is
    chosen for all of them, as one process chooses it (a share fits where the whole does not),
    so that the pruned model does not depend on how many processes there are."""
    import argparse

    from modhifi.__main__ import _compensation
    from modhifi.data import Batches
    from modhifi.distributed import ALONE
    from modhifi.prune import apply as prune_apply
    from modhifi.prune import sequential_recordings
    from modhifi.zoo import open_subject

    subject = open_subject("digits-cnn", device=torch.device("cpu"))
    model, shape = subject.loaded.model, subject.dataset.input_shape
    order = trace_structure(model, shape).consumers
    per_image = sequential_recordings(model, torch.zeros(1, *shape), order, 1).nbytes
    monkeypatch.setattr(prune_apply, "FRONTIER_BYTES", 150 * per_image)
    share = Batches(subject.dataset.calibration.subset(slice(0, 100)), 100)  # half of 200
    args = argparse.Namespace(compensation=None, shard=ALONE)
    assert _compensation(args, "modhifi-greedy", model, share, 200, order) == "refit"
    assert _compensation(args, "modhifi-greedy", model, share, 100, order) == "sequential"


def test_without_recalibration_the_sequential_refit_fits_the_whole_output():
    """No BatchNorm re-estimation: nothing would remove a mean left out, so nothing is centred."""
    torch.manual_seed(0)
    model = nets.ResNet(widths=(8, 16, 32)).double().eval()
    batches = [torch.randn(32, 1, 16, 16, dtype=torch.float64) for _ in range(4)]
    recalibrate_batchnorm(model, batches)
    analysis = analyse(model, batches, device=torch.device("cpu"), lam=0)
    plan = analysis.plan(0.5, target_kind="channels", method="modhifi", round_to=1)
    pruned = analysis.apply(plan, compensation="sequential", recalibrate=False)
    oracle = _sequential_oracle(analysis.model, analysis.structure, plan, batches,
                                recalibrating=False)
    probe = torch.randn(16, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), oracle(probe), rtol=1e-7, atol=1e-9)


def test_without_recalibration_the_one_shot_refit_fits_the_whole_output():
    """No BatchNorm re-estimation: the refit is least squares on the dense model's own inputs,
    uncentred (with re-estimation the mean goes to BatchNorm; without, a refit on centred
    statistics left it out: digits-cnn at 30% of the channels fell from 96.4% to 60.8%)."""
    import copy

    from modhifi.prune.apply import kept_inputs

    torch.manual_seed(0)
    model = nets.ResNet(widths=(8, 16, 32)).double().eval()
    batches = [torch.randn(32, 1, 16, 16, dtype=torch.float64) for _ in range(4)]
    recalibrate_batchnorm(model, batches)
    analysis = analyse(model, batches, device=torch.device("cpu"), lam=0)
    assert analysis.structure.followed_by_norm  # centred statistics are in play
    plan = analysis.plan(0.5, target_kind="channels", method="modhifi", round_to=1)
    pruned = analysis.apply(plan, compensation="refit", recalibrate=False)
    oracle = copy.deepcopy(analysis.model)
    for name, keep in kept_inputs(analysis.structure, analysis.model,
                                  plan.removed_channels()).items():
        layer = oracle.get_submodule(name)
        W = layer.weight.detach().reshape(len(layer.weight), -1)       # (c_out, d)
        K = W.shape[1] // layer.weight.shape[1]
        C = [int(i) * K + j for i in keep for j in range(K)]
        P = _patches(layer, _inputs(analysis.model, name, batches))     # (N·L, d) dense
        new = torch.zeros_like(W)
        new[:, C] = torch.linalg.lstsq(P[:, C], P @ W.T).solution.T
        with torch.no_grad():
            layer.weight.copy_(new.reshape(layer.weight.shape))
    probe = torch.randn(16, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(probe), oracle(probe), rtol=1e-7, atol=1e-9)


class _Keyed(nets.ResNet):
    """A ResNet called with its images by keyword: calibration batches are dicts."""

    def forward(self, image):
        return super().forward(image)


def test_the_sequential_refit_takes_dict_batches_as_it_takes_tensors():
    torch.manual_seed(0)
    model = _Keyed(widths=(8, 16)).double().eval()
    batches = [torch.randn(32, 1, 16, 16, dtype=torch.float64) for _ in range(3)]
    recalibrate_batchnorm(model, batches)
    tensors = analyse(model, batches, device=torch.device("cpu"), lam=0)
    dicts = analyse(model, [{"image": b} for b in batches], device=torch.device("cpu"), lam=0)
    plan = tensors.plan(0.5, target_kind="channels", method="modhifi", round_to=1)
    probe = torch.randn(8, 1, 16, 16, dtype=torch.float64)
    expected, got = (a.apply(plan, compensation="sequential") for a in (tensors, dicts))
    with torch.no_grad():
        torch.testing.assert_close(got(probe), expected(probe), rtol=1e-10, atol=1e-12)


def test_batchnorm_recalibration_matches_the_calibration_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(16, 2, 8, 8) * 3 + 1 for _ in range(3)]
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        features = torch.stack([model[0](b) for b in batches])     # (batches, N, C, H, W)
    # the mean over batches of each batch's mean and unbiased variance
    torch.testing.assert_close(model[1].running_mean, features.mean((1, 3, 4)).mean(0))
    torch.testing.assert_close(model[1].running_var, features.var((1, 3, 4)).mean(0))
    assert not model[1].training


def test_a_lone_last_calibration_image_joins_the_pass_before_it():
    """BatchNorm in training mode cannot take one image of 1×1 maps: 129 calibration images, in
    passes of 128, left one; it now goes with the pass before it (torch's own statistics of
    all 129 are the oracle), the command line's batches leave none, and a single image is one
    clear error."""
    from modhifi.distributed import CALIBRATION_BATCH, calibration_batch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 4), nn.BatchNorm2d(3), nn.Flatten()).eval()  # 1×1 maps
    images = torch.randn(129, 2, 4, 4) * 3 + 1
    recalibrate_batchnorm(model, [images])
    with torch.no_grad():
        features = model[0](images)                                # (129, 3, 1, 1)
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, features.var((0, 2, 3)))
    for samples in range(2, 2000):
        size = calibration_batch(samples)
        assert samples % size != 1 and (size == CALIBRATION_BATCH or samples % 128 == 1)
    with pytest.raises(UserError, match="batches of 2 images or more"):
        recalibrate_batchnorm(model, [images[:1]])


def test_unreachable_target_and_bad_options_are_clear_errors():
    from modhifi.errors import UserError

    analysis = _analysis(nets.tiny_cnn(), (1, 8, 8), samples=32)
    with pytest.raises(UserError, match="cannot be reached"):
        analysis.plan(0.9, target_kind="macs", floor=0.5)
    with pytest.raises(UserError, match="must be in"):
        analysis.plan(1.5)
    with pytest.raises(UserError, match="unknown method"):
        analysis.plan(0.3, method="taylor")
    with pytest.raises(UserError, match="must be at least 1"):
        analysis.plan(0.3, round_to=0)


@pytest.mark.parametrize("options", [{"target_kind": "macs"}, {"round_to": 16},
                                     {"allocation": "global", "floor": 0.3}])
def test_most_is_the_largest_target_a_plan_reaches(options):
    """The dashboard's slider ends at `most`: a plan for it exists, one just past it does not,
    and the plan for 1.0 − ε (every knob at its end) removes exactly `most` up to rounding."""
    analysis = _analysis(nets.ResNet(), (1, 28, 28))
    most = analysis.most(**options)
    plan = analysis.plan(most, **options)
    achieved = 1 - (plan.macs_after / plan.macs_before if options.get("target_kind") == "macs"
                    else plan.channels_after / plan.channels_before)
    assert most <= achieved < most + 0.001
    with pytest.raises(UserError, match=f"at most {most:g} of the"):
        analysis.plan(most + 0.002, **options)


def test_groups_and_consumers_come_in_forward_order():
    """A model whose modules are declared in the reverse of their call order: every table
    follows the calls, not the declarations (nor Torch-Pruning's graph walk)."""
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.last = nn.Linear(16, 10)
            self.middle = nn.Conv2d(8, 16, 3)
            self.first = nn.Conv2d(1, 8, 3)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.last(self.pool(torch.relu(self.middle(torch.relu(self.first(x))))).flatten(1))

    structure = trace_structure(Reversed().eval(), (1, 12, 12))
    assert [g.name for g in structure.groups] == ["first", "middle"]
    assert structure.consumers == ("middle", "last")
    resnet = trace_structure(nets.ResNet(), (1, 28, 28))
    order = [name for name in resnet.order if name in resnet.consumers]
    assert list(resnet.consumers) == order and resnet.consumers[-1] == "head.2"


def test_the_channel_card_matches_a_masked_forward_and_its_plan_removes_one_channel():
    """The card's numbers against independent computations on the same calibration batches:
    the uncompensated output error of a layer is that of a forward pass with the channel zeroed
    (about the mean at each position where BatchNorm follows); the drivers are the images with the largest mean input on
    the channel; the ranks are positions in each method's ranking; the plan removes one."""
    from modhifi.prune import card

    analysis = _analysis(nets.tiny_cnn(), (1, 8, 8), samples=64)
    layer = next(n for n in analysis.fidelity
                 if isinstance(analysis.model.get_submodule(n), nn.Conv2d))
    shown = card.channel_card(analysis, layer, 3, images=4)
    conv = analysis.model.get_submodule(layer)
    inputs = []
    handle = conv.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    try:
        with torch.no_grad():
            for batch in analysis.calibration:
                analysis.model(batch)
    finally:
        handle.remove()
    x = torch.cat(inputs).double()  # (N, C, h, w)
    masked = x.clone()
    masked[:, 3] = 0
    weight = conv.weight.double()
    full = nn.functional.conv2d(x, weight, stride=conv.stride, padding=conv.padding)
    cut = nn.functional.conv2d(masked, weight, stride=conv.stride, padding=conv.padding)
    if layer in analysis.structure.followed_by_norm:  # centred per position (LayerMoments)
        full, cut = (y - y.mean(0, keepdim=True) for y in (full, cut))
    assert shown.error_removed == pytest.approx(float(((full - cut) ** 2).sum() / (full ** 2).sum()),
                                                rel=1e-6)
    assert 0 <= shown.error_refit <= shown.error_removed
    strongest = x[:, 3].mean((1, 2)).topk(4)
    assert list(shown.drivers) == strongest.indices.tolist()
    group, j = card.group_of(analysis, layer, 3)
    assert shown.ranks["l1"] == analysis.ranking("l1")[group.name].order.index(j) + 1
    plan = card.without_channel(analysis, shown)
    assert plan.channels_after == plan.channels_before - 1 and plan.groups[0].removed == (j,)
    pruned = analysis.apply(plan)
    assert count_cost(pruned, (1, 8, 8)).macs == plan.macs_after
    with pytest.raises(UserError, match="input channels 0 to"):
        card.channel_card(analysis, layer, 10_000)


def test_the_greedy_steps_add_up_to_each_prefix_refit_fidelity():
    """A residual stream (read by several layers): the table's running fidelity after k steps is
    the mean, over every output of every reading layer, of the share of its energy that the
    refit of the first k channels reproduces (the compensation path, `refit_weight` and
    `reconstruction_error`, not the greedy's Schur complements); the union ranks are places in
    the union-rule order."""
    from modhifi.prune import card

    analysis = _analysis(nets.ResNet(), (1, 28, 28))
    group = max((g for g in analysis.structure.groups if g.size <= 32),
                key=lambda g: len(g.consumers))
    assert len(group.consumers) > 1
    layer = group.consumers[0][0]
    index = dict(group.consumers)[layer]
    steps = card.greedy_steps(analysis, layer, index[0])
    greedy = analysis.ranking("modhifi-greedy")[group.name].order
    assert list(steps["channel"]) == [index[j] for j in greedy]
    union = analysis.ranking("modhifi")[group.name].order
    assert list(steps["union_rank"]) == [union.index(j) + 1 for j in greedy]
    for k in (1, 5, group.size):
        total = outputs = 0
        for name, consumer_index in group.consumers:
            fidelity = analysis.fidelity[name]
            kept = torch.tensor(sorted(consumer_index[j] for j in greedy[:k]))
            error = fidelity.reconstruction_error(fidelity.refit_weight(kept))  # (c_out,)
            alive = fidelity.energy > 0
            total += float((1 - error[alive] / fidelity.energy[alive]).sum())
            outputs += fidelity.w.shape[0]
        assert steps["fidelity"][k - 1] == pytest.approx(total / outputs, abs=1e-3)


def test_the_channel_card_of_a_token_layer_draws_the_channel_over_the_patch_grid():
    """A ViT's FFN output layer reads (B, 1 + s², C): the card's map of a channel is its value
    at each patch token on the s × s grid (the class token left out), and the drivers are the
    images with the largest mean over the patches."""
    from modhifi.prune import card

    vit = nets.ViT(image_size=12, patch=4, dim=16, depth=1, heads=2, hidden=24)  # 3 × 3 patches
    analysis = _analysis(vit, (1, 12, 12), samples=32)
    layer = "blocks.0.ffn.fc2"
    shown = card.channel_card(analysis, layer, 5, images=3)
    inputs = []
    handle = vit.get_submodule(layer).register_forward_pre_hook(
        lambda m, args: inputs.append(args[0].clone()))
    try:
        with torch.no_grad():
            for batch in analysis.calibration:
                vit(batch)
    finally:
        handle.remove()
    patches = torch.cat(inputs)[:, 1:, 5]  # (N, 9): the channel at each patch token
    strongest = patches.mean(1).topk(3)
    assert list(shown.drivers) == strongest.indices.tolist()
    assert shown.strength == pytest.approx(strongest.values.tolist(), rel=1e-5)
    assert shown.maps.shape == (3, 3, 3)
    assert torch.allclose(torch.from_numpy(shown.maps).flatten(1), patches[strongest.indices],
                          atol=1e-6)


def test_greedy_plans_keep_multiples_of_round_to_at_the_planned_cost():
    analysis = _analysis(nets.ResNet(), (1, 28, 28))
    for ranking in analysis.ranking("modhifi-greedy").values():
        assert sorted(ranking.order) == list(range(len(ranking.order)))
        assert all(a >= b for a, b in zip(ranking.score, ranking.score[1:]))
    plan = analysis.plan(0.5, target_kind="macs", method="modhifi-greedy", scope="internal",
                         round_to=16)
    assert all(len(g.kept) % 16 == 0 for g in plan.groups)
    assert plan.macs_after <= 0.5 * plan.macs_before
    cost = count_cost(analysis.apply(plan), (1, 28, 28))
    assert (cost.macs, cost.params) == (plan.macs_after, plan.params_after)


def test_cli_prune_writes_a_model_that_reloads_with_the_same_accuracy(tmp_path, monkeypatch,
                                                                      capsys):
    """To a latency target, planned with the cost model cached under MODHIFI_CACHE (a synthetic
    one, so that what the plan can reach does not depend on the machine's load): planned beside
    measured speed-up, the targets tried, and a written model that reloads with the same
    figures. (In this process: the way out of a real one is test_cli's.)"""
    from modhifi.prune import CostModel

    out = tmp_path / "pruned.pt"
    monkeypatch.setenv("MODHIFI_CACHE", str(tmp_path / "cache"))
    costs = cache_synthetic_costs("digits-cnn", 8)

    def cli(*args):
        done = command_line(capsys, *args, "--json", "--device", "cpu", "--batch-size", "8")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    pruned = cli("prune", "--model", "digits-cnn", "--target", "0.1", "--target-kind", "latency",
                 "--calib-samples", "200", "--out", str(out))
    assert PRUNE_KEYS <= set(pruned) and "speedup_planned" in pruned
    assert pruned["latency_targets_tried"][0] == 0.1 and pruned["macs_after"] < pruned["macs_before"]
    assert pruned["speedup_planned"] >= 1 / 0.9 - 1e-9 and pruned["speedup_measured"] > 0
    # where the timing on a loaded box falls short, the CLI cuts again (a smaller model): the
    # first cut's accuracy is bounded tightly, any later one only well above chance (10%)
    first_cut_only = pruned["latency_targets_tried"] == [0.1]
    assert pruned["accuracy_after"] > (0.85 if first_cut_only else 0.3)
    # the one cost model file, read as written (a measured one would have replaced it)
    [cached] = (tmp_path / "cache" / "latency").iterdir()
    assert CostModel.from_json(cached.read_text()) == costs
    assert pruned["compensation"] == "sequential"  # the default, where its recordings fit
    reloaded = cli("info", "--model", str(out))
    assert reloaded["accuracy"] == pruned["accuracy_after"]
    assert reloaded["macs"] == pruned["macs_after"]
    removed = json.loads((tmp_path / "pruned.pt.channels.json").read_text())
    assert sum(map(len, removed.values())) == pruned["channels_before"] - pruned["channels_after"]


def test_iterative_mode_reaches_the_target_in_rounds(monkeypatch):
    """Each round starts where the last ended; given the model's structure (as the command line
    traces it once for its other uses), the first round does not trace it again, and the rounds
    are the same."""
    from modhifi.prune import analysis as analysis_module, prune_in_steps

    model = nets.ResNet(widths=(16, 32, 64))
    torch.manual_seed(1)
    batches = [torch.randn(32, 1, 16, 16) for _ in range(2)]
    recalibrate_batchnorm(model.eval(), batches)
    before = snapshot(model)
    rounds = dict(device=torch.device("cpu"), input_shape=(1, 16, 16), target=0.5, steps=3,
                  target_kind="macs")
    pruned, plans = prune_in_steps(model, batches, **rounds)
    assert len(plans) == 3
    assert plans[1].macs_before == plans[0].macs_after  # each round starts where the last ended
    assert count_cost(pruned, (1, 16, 16)).macs == plans[-1].macs_after <= 0.5 * plans[0].macs_before
    assert_unchanged(model, before)
    traced = []
    monkeypatch.setattr(analysis_module, "trace_structure",
                        lambda *args: traced.append(args) or trace_structure(*args))
    _, given = prune_in_steps(model, batches, structure=trace_structure(model, (1, 16, 16)),
                              **rounds)
    assert len(traced) == 2 and given == plans


def test_a_round_ranks_only_by_the_method_asked(monkeypatch):
    """Sizing the model a round starts from needs no ranking of its own: a baseline's rounds
    do not pay for the greedy ranking (seconds on wide layers), nor fail where it fails."""
    from modhifi.prune import analysis as analysis_module, prune_in_steps

    model = nets.ResNet(widths=(16, 32, 64)).eval()
    torch.manual_seed(1)
    batches = [torch.randn(32, 1, 16, 16) for _ in range(2)]
    ranked = []
    real = analysis_module.rank
    monkeypatch.setattr(analysis_module, "rank",
                        lambda groups, method, evidence: ranked.append(method)
                        or real(groups, method, evidence))
    prune_in_steps(model, batches, device=torch.device("cpu"), input_shape=(1, 16, 16),
                   target=0.5, steps=2, method="l1")
    assert ranked == ["l1", "l1"]  # once a round


def test_the_command_line_traces_the_structure_once(monkeypatch, capsys):
    """`prune` chooses its compensation, analyses, plans and applies on one trace of the model's
    channel groups (a trace is seconds on large models)."""
    from modhifi import prune
    from modhifi.__main__ import main
    from modhifi.prune import analysis as analysis_module

    traced = []

    def counted(*args):
        traced.append(args)
        return trace_structure(*args)

    for module in (prune, analysis_module):
        monkeypatch.setattr(module, "trace_structure", counted)
    assert main(["prune", "--model", "digits-cnn", "--target", "0.3", "--device", "cpu",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compensation"] == "sequential"
    assert len(traced) == 1


def test_every_method_is_one_importance_of_the_registry_with_a_valid_ranking():
    """The CLI's, the pages' and the library's methods are the registry's; each importance ranks
    every channel of every group once, scores in [0, 1] never rising along the order."""
    analysis = _analysis(nets.ResNet(widths=(8, 16, 24)), (1, 12, 12), samples=64)
    assert tuple(IMPORTANCES) == choices(Method) == tuple(METHOD_LABELS)
    evidence = Evidence(analysis.model, analysis.fidelity, seed=3)
    for method, importance in IMPORTANCES.items():
        for group in analysis.structure.groups:
            ranking = importance(group, evidence)
            assert sorted(ranking.order) == list(range(group.size)), method
            score = torch.tensor(ranking.score)
            assert score.max() == 1 and score.min() >= 0 and (score.diff() <= 0).all(), method
        assert rank(analysis.structure.groups, method, evidence) == \
            analysis.ranking(method, seed=3), method
    with pytest.raises(UserError, match="unknown method 'l2'"):
        analysis.ranking("l2")


def test_union_rule_keeps_every_hifi_set_union_as_a_prefix():
    """Brute force of the paper's rule (§3.4): for every size k, the channels that are in the
    top-k by singleton fidelity of some output of some consumer come first in the order."""
    analysis = _analysis(nets.ResNet(widths=(8, 16, 24)), (1, 12, 12), samples=64)
    rankings = analysis.ranking("modhifi")
    for group in analysis.structure.groups:
        order = rankings[group.name].order
        for k in range(1, group.size + 1):
            union = set()
            for name, index in group.consumers:
                s = analysis.fidelity[name].singleton[:, list(index)]  # (c_out, group size)
                union.update(int(i) for row in s.argsort(1, descending=True)[:, :k] for i in row)
            assert set(order[:len(union)]) == union, (group.name, k)


@pytest.mark.parametrize("target", [0.2, 0.45])
def test_global_allocation_keeps_the_best_scores_across_groups(target):
    """Brute force of the global allocation: with exact counts, no removed channel of any
    group scores above a kept one (groups' scores normalised to [0, 1]), unless a group's floor
    of one channel forced it. The default method: greedy, its gains normalised per group."""
    analysis = _analysis(nets.vgg(stages=((8, 12), (16,))), (1, 12, 12), samples=64)
    plan = analysis.plan(target, allocation="global", round_to=1, floor=0.0)
    rankings = analysis.ranking(plan.method)
    kept, removed = [], []
    for group in plan.groups:
        score = dict(zip(rankings[group.name].order, rankings[group.name].score))
        kept += [score[c] for c in group.kept if len(group.kept) > 1]  # floor-forced: not chosen
        removed += [score[c] for c in group.removed]
    assert removed and min(kept) >= max(removed)
    assert plan.channels_after / plan.channels_before <= 1 - target


class _TwoInputs(nn.Module):
    """Takes features and a mask, as a text encoder takes token embeddings and attention."""

    def __init__(self):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, features, mask):  # (B, T, 6), (B, T)
        hidden = self.ffn(features) * mask[..., None]
        return self.head(hidden.sum(1) / mask.sum(1, keepdim=True))


@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_inputs_of_any_form_are_analysed_planned_and_pruned(form):
    from oracles import masked_dense

    torch.manual_seed(0)
    model = _TwoInputs().eval()
    features, mask = torch.randn(16, 5, 6), (torch.rand(16, 5) > 0.3).float()
    mask[:, 0] = 1
    batch = {"features": features, "mask": mask} if form == "dict" else (features, mask)
    call = (lambda m: m(**batch)) if form == "dict" else (lambda m: m(*batch))
    analysis = analyse(model, [batch], device=torch.device("cpu"))
    assert [g.producers for g in analysis.structure.groups] == [("ffn.0",)]
    plan = analysis.plan(0.5, target_kind="channels", round_to=1)
    pruned = analysis.apply(plan, compensation="none", recalibrate=False)
    one = {k: v[:1] for k, v in batch.items()} if form == "dict" else (features[:1], mask[:1])
    assert count_cost(pruned, one).macs == plan.macs_after < plan.macs_before
    with torch.inference_mode():
        torch.testing.assert_close(call(pruned), call(masked_dense(model, analysis.structure, plan)))


def test_the_architecture_is_in_forward_order_and_its_kept_fidelity_is_the_explicit_one():
    """Nodes are the Conv2d/Linear layers in call order with the plan's kept shares; each
    consumer's kept fidelity (from the statistics) equals 1 − ‖Y − Y'‖² / ‖Y‖² computed on the
    captured calibration inputs with the refitted weight (bias left out on both sides; centred
    where a BatchNorm follows, as the analysis is)."""
    from modhifi.hooks import hooked
    from modhifi.prune.architecture import architecture, readable

    model = nets.ResNet(widths=(8, 16, 32))
    analysis = _analysis(model, (1, 16, 16), samples=64)
    plan = analysis.plan(0.5, target_kind="channels")
    drawn = architecture(analysis, plan)
    nodes = drawn.nodes.set_index("layer")
    assert list(nodes.index) == list(analysis.structure.order)
    assert nodes.loc["layers.0.conv1", "name"] == readable("layers.0.conv1") == "layers 0 · conv 1"
    for group in plan.groups:
        for producer in analysis.structure.group(group.name).producers:
            assert nodes.loc[producer, "kept"] == len(group.kept) / group.size
    position = {name: i for i, name in enumerate(nodes.index)}
    assert all(position[s] < position[t] for s, t in zip(drawn.edges["source"], drawn.edges["target"]))

    captured = {}
    keep = kept_inputs(analysis.structure, analysis.model, plan.removed_channels())
    hooks = {name: (lambda name: lambda module, args: captured.setdefault(name, []).append(args[0]))(name)
             for name in keep}
    with hooked(analysis.model, before=hooks) as run, torch.inference_mode():
        for batch in analysis.calibration:
            run(batch)
    for name, kept in keep.items():
        layer = analysis.model.get_submodule(name)
        x = torch.cat(captured[name]).double()
        refit = analysis.fidelity[name].refit_weight(kept).double()
        y = torch.nn.functional.conv2d(x, layer.weight.double(), None, layer.stride, layer.padding) \
            if isinstance(layer, nn.Conv2d) else x @ layer.weight.double().T
        y_kept = torch.nn.functional.conv2d(x, refit, None, layer.stride, layer.padding) \
            if isinstance(layer, nn.Conv2d) else x @ refit.T
        if name in analysis.structure.followed_by_norm:  # BatchNorm removes each mean
            y, y_kept = y - y.mean(0), y_kept - y_kept.mean(0)
        explicit = 1 - float(((y - y_kept) ** 2).sum() / (y ** 2).sum())
        assert nodes.loc[name, "fidelity"] == pytest.approx(explicit, rel=1e-4, abs=1e-6), name
    assert (nodes.drop(index=list(keep))["fidelity"].dropna() == 1).all()


def test_a_group_pruned_alone_and_per_group_overrides():
    from modhifi.prune.architecture import only_group

    model = nets.ResNet(widths=(8, 16, 32))
    analysis = _analysis(model, (1, 16, 16))
    plan = analysis.plan(0.4, target_kind="macs")
    name = [g.name for g in plan.groups if g.removed][1]
    alone = only_group(analysis, plan, name)
    assert alone.removed_channels() == {name: plan.removed_channels()[name]}
    pruned = analysis.apply(alone, compensation="refit")
    assert (count_cost(pruned, (1, 16, 16)).macs, count_cost(pruned, (1, 16, 16)).params) == \
        (alone.macs_after, alone.params_after)

    # An override fixes that group's share; the rest still reach the target.
    overridden = analysis.plan(0.3, round_to=1, overrides={name: 0.75})
    sizes = {g.name: (len(g.removed), g.size) for g in overridden.groups}
    assert sizes[name][0] == round(0.75 * sizes[name][1])
    assert overridden.achieved >= 0.3
    others = [removed / size for group, (removed, size) in sizes.items() if group != name]
    assert max(others) < 0.3  # the override took part of the target off the other groups
    # An override past the target leaves the other groups whole.
    alone_by_override = analysis.plan(0.05, round_to=1, overrides={name: 0.9})
    assert alone_by_override.removed_channels().keys() == {name}
    with pytest.raises(UserError, match="not a channel group"):
        analysis.plan(0.3, overrides={"nowhere": 0.5})
    with pytest.raises(UserError, match="out of range"):
        analysis.plan(0.3, overrides={name: 1.5})


def test_the_trace_and_the_cut_let_go_of_the_weights_they_no_longer_need(monkeypatch):
    """Torch-Pruning's nodes refer to each other in cycles: left so, the trace's copy of the
    model (its modules and buffers; it shares the weights) and the weights a cut replaced
    (gigabytes for a large model) would wait for Python's next full collection."""
    import gc
    import weakref

    from modhifi.prune import structure

    structure.trace_structure(nets.ResNet(), (1, 28, 28))  # torch's lazy imports, once a process
    copies, copy = [], structure.shared_copy

    def kept_track_of(model, **where):
        copied = copy(model, **where)
        copies.append([weakref.ref(t) for t in (*copied.modules(), *copied.parameters(),
                                                *copied.buffers())])
        return copied

    monkeypatch.setattr(structure, "shared_copy", kept_track_of)
    model = nets.ResNet()
    gc.disable()  # only reference counts free them
    try:
        structure.trace_structure(model, (1, 28, 28))
        assert len(copies) == 1 and copies[0] and all(p() is None for p in copies[0])
        replaced = [weakref.ref(p) for p in model.stem[0].parameters()]  # cut: new tensors
        cut_channels(model, {"stem.0": [0, 1]}, (1, 28, 28))
        assert model.stem[0].out_channels == 30 and all(p() is None for p in replaced)
    finally:
        gc.enable()


def test_a_target_the_later_rounds_cannot_reach_is_said_in_the_users_terms():
    """Only a ViT's FFN neurons go, so at most a share of its MACs: a target past it, asked in
    two rounds, passes the first round and fails the second, whose message names the target
    asked for and the rounds (it named the second round's own share of what was left)."""
    from modhifi.prune import prune_in_steps

    torch.manual_seed(0)
    model = nets.ViT(image_size=16, dim=16, depth=2, heads=2, hidden=32).eval()
    batches = [torch.randn(16, 1, 16, 16)]
    reach = analyse(model, batches, device=torch.device("cpu"),
                    input_shape=(1, 16, 16)).most(target_kind="macs")
    target = round(min(0.95, reach + 0.05), 2)
    with pytest.raises(UserError, match=rf"^target {target:g} cannot be reached in 2 rounds: "
                                        r"after round 1 .* lower the target or prune in fewer"):
        prune_in_steps(model, batches, device=torch.device("cpu"), input_shape=(1, 16, 16),
                       target=target, steps=2, target_kind="macs")
