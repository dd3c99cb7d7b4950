"""Many sessions on one shared model (the dashboard's situation): each gets exactly its serial
numbers, and the shared model stays bit-identical, with no hook, mode or thread-count change.

Streamlit runs each session's script in a thread of one process and hands every session the same
cached model object, so threads calling the library paths the pages call are the real thing.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from modhifi.metrics import count_cost, evaluate, measure_latency
from modhifi.prune import analyse
from modhifi.theory import invariance
from modhifi.unlearn import editable_layers, unlearn
from oracles import assert_unchanged, snapshot
from ui.store import SharedResults

SESSIONS = 8


def _session(shared, index: int) -> dict:
    """What one visitor's pages compute: statistics and scores on their calibration size, a plan
    at their slider position, the pruned model's accuracy and MACs, a forgotten class, the
    editable layers, invariance by depth, and a latency measurement."""
    model, data, cpu = shared.loaded.model, shared.dataset, torch.device("cpu")
    calibration = data.calibration.subset(slice(0, 96 + 24 * index)).batches(48)
    analysis = analyse(model, calibration, device=cpu, input_shape=data.input_shape)
    plan = analysis.plan(0.15 + 0.05 * index, target_kind="macs",
                         method=("modhifi", "modhifi-greedy")[index % 2])
    pruned = analysis.apply(plan)
    live = data.test.subset(slice(0, 200))
    forgotten = unlearn(model, data, forget_class=index, device=cpu, k=0.05, layers=2)
    images = next(data.test.batches(16))
    measure_latency(model, data.input_shape, backend=_cpu(), batch_size=8, warmup=1, repeats=2)
    return {
        "singleton": {n: f.singleton for n, f in analysis.fidelity.items()},
        "kept": [g.kept for g in plan.groups],
        "macs": (plan.macs_after, count_cost(pruned, data.input_shape).macs),
        "accuracy": evaluate(pruned, live, device=cpu, num_classes=data.num_classes).confusion,
        "dense": evaluate(model, live, device=cpu, num_classes=data.num_classes).confusion,
        "forgotten": (forgotten.plan.layers, forgotten.after.per_class),
        "editable": editable_layers(model, images),
        "invariance": invariance({"dense": model}, images, shifts=(0, 1), deformations=(1.0,)),
    }


def _cpu():
    from modhifi.backend import choose_backend

    return choose_backend("cpu")


def _assert_same(a: dict, b: dict, session: int) -> None:
    for name in a["singleton"]:
        assert torch.equal(a["singleton"][name], b["singleton"][name]), (session, name)
    assert a["kept"] == b["kept"], session
    assert a["macs"] == b["macs"] and a["macs"][0] == a["macs"][1], session
    assert a["accuracy"] == b["accuracy"] and a["dense"] == b["dense"], session
    assert a["forgotten"] == b["forgotten"], session
    assert a["editable"] == b["editable"], session
    assert a["invariance"].equals(b["invariance"]), session


@pytest.mark.slow
def test_eight_sessions_at_once_get_their_serial_numbers_and_leave_the_model_alone():
    from conftest import subject

    shared = subject("digits-cnn")
    before = snapshot(shared.loaded.model)
    threads = torch.get_num_threads()
    serial = [_session(shared, i) for i in range(SESSIONS)]
    start = threading.Barrier(SESSIONS)

    def concurrent(index: int) -> dict:
        start.wait()  # every session starts at the same moment
        return _session(shared, index)

    with ThreadPoolExecutor(SESSIONS) as pool:
        together = list(pool.map(concurrent, range(SESSIONS)))
    for index, (alone, crowded) in enumerate(zip(serial, together)):
        _assert_same(alone, crowded, index)
    assert_unchanged(shared.loaded.model, before)
    assert torch.get_num_threads() == threads
    assert not nn.modules.module._global_forward_hooks  # no process-wide hook was left behind
    assert not nn.modules.module._global_forward_pre_hooks


def test_shared_results_compute_each_key_once_and_stay_bounded():
    store: SharedResults[int] = SharedResults(size=3)
    calls: list[int] = []
    gate = threading.Event()

    def slow(key: int):
        def compute() -> int:
            calls.append(key)
            gate.wait(5)  # every session asks while the first is still computing
            return key * key
        return compute

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(store.get, 7, slow(7)) for _ in range(8)]
        gate.set()
        assert [f.result() for f in futures] == [49] * 8
    assert calls == [7]  # computed once, the other seven sessions waited for it
    for key in range(5):
        store.get(key, slow(key))
    assert len(store) == 3 and calls == [7, 0, 1, 2, 3, 4]
    store.get(4, slow(99))  # still there: not recomputed
    store.get(0, slow(0))   # evicted (least recently used): computed again
    assert calls == [7, 0, 1, 2, 3, 4, 0]


def test_a_failed_computation_is_not_stored_and_can_be_retried():
    store: SharedResults[int] = SharedResults(size=2)

    def failing() -> int:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        store.get("k", failing)
    assert len(store) == 0 and store.get("k", lambda: 1) == 1


class _Scaled(nn.Module):
    """An unwrapped parameter whose 8 channels lie along its dimension 0."""

    def __init__(self):
        super().__init__()
        self.conv, self.scale = nn.Conv2d(3, 8, 3), nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale


class _Token(nn.Module):
    """An unwrapped parameter whose 16 features lie along its dimension 2."""

    def __init__(self):
        super().__init__()
        self.linear, self.token = nn.Linear(4, 16), nn.Parameter(torch.zeros(1, 1, 16))

    def forward(self, x):
        return self.linear(x) + self.token


def test_two_sessions_graphs_take_turns_on_torch_pruning_s_shared_pruners(monkeypatch):
    """Torch-Pruning sets the dimension to measure on one pruner shared by the whole process,
    then measures: a session's graph that sets 0 must not measure along another's 2."""
    from modhifi.prune.structure import dependency_graph

    a, b = _Scaled(), _Token()
    with dependency_graph(a, torch.randn(1, 3, 8, 8)) as graph_a, \
            dependency_graph(b, torch.randn(1, 5, 4)) as graph_b:
        pruner = type(graph_a.get_pruner_of_module(a.scale))
        measure = pruner.get_out_channels
        inside, meddled = threading.Event(), threading.Event()

        def slowed(self, parameter):  # session A pauses between setting its dimension and measuring
            if parameter is a.scale:
                inside.set()
                meddled.wait(1)  # session B's measurement, if it ran meanwhile
            else:
                meddled.set()
            return measure(self, parameter)

        monkeypatch.setattr(pruner, "get_out_channels", slowed)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(graph_a.get_out_channels, a.scale)
            inside.wait(5)
            second = pool.submit(graph_b.get_out_channels, b.token)
            assert (first.result(), second.result()) == (8, 16)


def test_the_callers_own_hooks_see_none_of_the_librarys_passes_and_stay_on_its_model():
    """A hook the caller put on the model sees only the caller's passes: not the analysis's, the
    surgery's or the pruned model's, whose modules carry none."""
    from modhifi import nets
    from modhifi.prune import analyse

    torch.manual_seed(0)
    model = nets.ResNet(widths=(16, 32)).eval()
    seen = []
    model.stem[0].register_forward_hook(lambda module, args, output: seen.append("forward"))
    model.stem[0].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    analysis = analyse(model, [torch.randn(8, 1, 28, 28)], device=torch.device("cpu"),
                       input_shape=(1, 28, 28))
    pruned = analysis.apply(analysis.plan(0.25))
    pruned(torch.randn(2, 1, 28, 28))
    assert seen == [] and not any(m._forward_hooks or m._forward_pre_hooks
                                  for m in pruned.modules())
    model(torch.randn(2, 1, 28, 28))
    assert seen == ["pre", "forward"]


def test_a_hooked_copy_shares_only_the_weights_and_leaves_the_model_alone():
    """`hooked` runs a copy that shares the storage of the model's weights (a large model is
    gigabytes) but has its own modules, parameter objects, modes and BatchNorm statistics, so
    that moving or converting it leaves the model alone; `shared_copy` copies only the
    parameters that live on another device, or that autograd cannot use (inference tensors)."""
    from modhifi import nets
    from modhifi.hooks import hooked, shared_copy

    torch.manual_seed(0)
    model = nets.ResNet(widths=(8, 16)).train()
    before, seen = snapshot(model), []
    with hooked(model, before={"stem.0": lambda module, args: seen.append(args[0].shape)}) as run:
        assert all(a is not b and a.data_ptr() == b.data_ptr()
                   for a, b in zip(run.parameters(), model.parameters(), strict=True))
        assert not any(a is b for a, b in zip(run.buffers(), model.buffers(), strict=True))
        assert not run.training
        run.train()(torch.randn(4, 1, 28, 28))  # a BatchNorm re-estimation, in the copy only
        assert not torch.equal(run.stem[1].running_mean, model.stem[1].running_mean)
        run.double().to(memory_format=torch.channels_last)  # its own parameter objects convert
    assert seen == [torch.Size([4, 1, 28, 28])]
    assert_unchanged(model, before)
    elsewhere = shared_copy(model, device="meta")
    assert all(p.is_meta for p in (*elsewhere.parameters(), *elsewhere.buffers()))
    assert_unchanged(model, before)
    with torch.inference_mode():
        made_in_inference = nets.ResNet(widths=(8, 16))
    usable = shared_copy(made_in_inference)
    assert not any(p.is_inference() for p in usable.parameters())
