"""Latency targets: the cost model's grid, interpolation, prediction and cache, and plans made
from it. Times are never asserted: a synthetic table whose time is bilinear in the widths makes
every prediction checkable against the pruned model's real layer widths."""
import dataclasses
import fcntl
import json
import math
import os
import threading

import pytest
import torch
from torch import nn

from modhifi import nets
from modhifi.errors import UserError
from modhifi.prune import (analyse, cost_file, measured_costs, prune_in_steps,
                           recalibrate_batchnorm)
from modhifi.prune.latency import CostModel, LayerTimes, candidate_widths, measure_costs
from oracles import layer_time, synthetic_costs

SHAPE = (1, 16, 16)


def _model_and_batches():
    model = nets.ResNet(widths=(16, 32, 64))
    torch.manual_seed(0)
    batches = [torch.randn(32, *SHAPE) for _ in range(2)]
    recalibrate_batchnorm(model.eval(), batches)
    return model, batches


@pytest.fixture(scope="module")
def measured(cpu):
    model, batches = _model_and_batches()
    analysis = analyse(model, batches, device=torch.device("cpu"), input_shape=SHAPE)
    return model, batches, analysis, measure_costs(analysis.model, analysis.structure, SHAPE,
                                                   backend=cpu, batch_size=4)


def _widths(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _explicit_ms(pruned: nn.Module, costs: CostModel, rest: float) -> float:
    """The oracle: each layer's synthetic time at the widths it really has after surgery, and
    the rest scaled by the share of its output activations kept (a negative rest: the layers'
    times scaled to the dense pass instead)."""
    spent = written = total = full = 0.0
    for name, times in costs.layers.items():
        c_in, c_out = _widths(pruned.get_submodule(name))
        spent += layer_time(c_in, c_out)
        full += layer_time(times.in_widths[-1], times.out_widths[-1])
        written += times.outputs * c_out / times.out_widths[-1]
        total += times.outputs
    return spent * (full + rest) / full if rest < 0 else spent + rest * written / total


def test_the_grid_covers_every_layer_where_a_group_can_change_it(measured):
    model, _, analysis, costs = measured
    convs = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(costs.layers) == set(convs)
    for name, times in costs.layers.items():
        c_in, c_out = _widths(convs[name])
        layer = analysis.structure.layers[name]
        assert times.in_widths == (candidate_widths(c_in) if layer.in_group else (c_in,))
        assert times.out_widths == (candidate_widths(c_out) if layer.out_group else (c_out,))
        assert len(times.ms) == len(times.in_widths)
        assert all(len(row) == len(times.out_widths) and min(row) > 0 for row in times.ms)
    assert candidate_widths(64) == (8, 16, 24, 32, 40, 48, 56, 64)
    spread = candidate_widths(200)  # 8 of the 25 multiples of 8 up to 200, evenly spread
    gaps = {b - a for a, b in zip(spread, spread[1:])}
    assert len(spread) == 8 and spread[0] == 8 and spread[-1] == 200
    assert all(w % 8 == 0 for w in spread) and gaps <= {24, 32}
    assert candidate_widths(5) == (5,)


def test_a_bilinear_time_is_interpolated_exactly_and_held_outside_the_grid():
    widths = (8, 16, 32)
    times = LayerTimes(widths, widths,
                       tuple(tuple(layer_time(i, o) for o in widths) for i in widths), 1)
    for c_in, c_out in [(8, 8), (12, 20), (31, 9), (32, 32), (16, 24)]:
        assert times.at(c_in, c_out) == pytest.approx(layer_time(c_in, c_out))
    assert times.at(4, 40) == pytest.approx(layer_time(8, 32))  # the nearest timed widths


def test_a_latency_target_is_planned_where_a_narrower_layer_is_timed_slower():
    """Measured times fall as often as they rise between neighbouring widths (16-wide vector
    units, noise), so the predicted saving of a uniform plan need not grow with its strength: a
    bisection could stop at a knob that prunes more than needed, and the strongest knob is not
    always the one that saves most. Here 8 channels are timed slower than 16: keeping 16 saves
    most. The plan for that saving keeps 16, and `most` says so (it said the strongest
    knob's saving, and refused the target)."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 16, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    analysis = analyse(model, [torch.randn(8, 3, 8, 8)], device=torch.device("cpu"),
                       input_shape=(3, 8, 8))
    widths = candidate_widths(64)  # 8, 16, …, 64
    times = {"0": LayerTimes((3,), widths, ((1.2, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0),), 64 * 36),
             "2": LayerTimes(widths, (16,), tuple((0.1,) for _ in widths), 16 * 36),
             "6": LayerTimes((16,), (10,), ((0.01,),), 10)}
    costs = CostModel("CPU", 8, 4.11, times)
    dense = costs.predict(analysis.structure, {})
    best = 1 - costs.predict(analysis.structure, {"0": 16}) / dense  # 0.73
    most = analysis.most(target_kind="latency", costs=costs, floor=0.1)
    assert most == math.floor(best * 1000) / 1000
    plan = analysis.plan(most, target_kind="latency", costs=costs, floor=0.1)
    kept = {g.name: len(g.kept) for g in plan.groups}
    assert kept["0"] == 16 and plan.achieved >= most
    weaker = analysis.plan(0.6, target_kind="latency", costs=costs, floor=0.1)
    assert {g.name: len(g.kept) for g in weaker.groups}["0"] > 16  # the weakest that reaches it


def test_the_most_of_a_latency_target_is_reached_on_measured_times(measured):
    """On the times this machine measured (however noisy): the most a uniform plan removes is
    the largest share over the knobs tried, and a plan for it exists."""
    from modhifi.options import FLOOR
    from modhifi.prune.plan import SCAN, removed_share

    _, _, analysis, costs = measured
    removed = removed_share(analysis.structure, analysis.ranking("modhifi"), "latency",
                            "uniform", FLOOR, 8, costs=costs)
    shares = [removed(k / SCAN) for k in range(1, SCAN)] + [removed(1 + 1e-9)]
    most = analysis.most(target_kind="latency", method="modhifi", costs=costs)
    assert most == math.floor(max(shares) * 1000) / 1000
    assert analysis.plan(most, target_kind="latency", method="modhifi",
                         costs=costs).achieved >= most


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_latency_plan_predicts_the_pruned_models_time_and_meets_its_target(measured,
                                                                            allocation):
    model, _, analysis, costs = measured
    synthetic = synthetic_costs(costs, rest=0.5)
    assert synthetic.predict(analysis.structure, {}) == pytest.approx(synthetic.dense_ms)
    plan = analysis.plan(0.4, target_kind="latency", allocation=allocation, costs=synthetic)
    pruned = analysis.apply(plan)
    assert plan.latency_before_ms == pytest.approx(synthetic.dense_ms)
    assert plan.latency_after_ms == pytest.approx(_explicit_ms(pruned, synthetic, 0.5))
    assert plan.achieved >= 0.4 and plan.speedup_planned >= 1 / 0.6
    # no block of 8 channels can be given back to any group without missing the target
    for group in plan.groups:
        if group.removed:
            more = {g.name: len(g.kept) + 8 * (g is group) for g in plan.groups}
            more[group.name] = min(more[group.name], group.size)
            assert synthetic.predict(analysis.structure, more) > 0.6 * plan.latency_before_ms
    # a channels target with a cost model carries its predicted time too
    by_channels = analysis.plan(0.3, costs=synthetic)
    assert by_channels.latency_after_ms == pytest.approx(
        _explicit_ms(analysis.apply(by_channels), synthetic, 0.5))
    assert analysis.plan(0.3).speedup_planned is None


def test_rounds_of_a_latency_target_each_start_where_the_last_ended(measured):
    model, batches, _, costs = measured
    # the optimised pass may fuse more than lone layers
    synthetic = synthetic_costs(costs, rest=-0.2)
    pruned, plans = prune_in_steps(model, batches, device=torch.device("cpu"), input_shape=SHAPE,
                                   target=0.5, steps=2, target_kind="latency", costs=synthetic)
    assert plans[1].latency_before_ms == pytest.approx(plans[0].latency_after_ms)
    assert plans[-1].latency_after_ms == pytest.approx(_explicit_ms(pruned, synthetic, -0.2))
    assert plans[-1].latency_after_ms <= 0.5 * plans[0].latency_before_ms + 1e-9


def test_the_cost_model_is_cached_beside_the_model_and_measured_again_when_unreadable(
        measured, cpu, tmp_path, monkeypatch):
    model, _, analysis, costs = measured
    path = cost_file(tmp_path, "net", model, cpu, 4, SHAPE)
    assert path != cost_file(tmp_path, "net", model, cpu, 8, SHAPE)  # another batch size
    assert path != cost_file(tmp_path, "net", model, cpu, 4, (1, 28, 28))  # other inputs
    assert path != cost_file(tmp_path, "net", nets.ResNet(widths=(16, 32, 48)), cpu, 4, SHAPE)
    monkeypatch.setattr("modhifi.prune.latency.measure_costs", lambda *a, **k: costs)
    assert measured_costs(model, analysis.structure, SHAPE, backend=cpu, batch_size=4,
                          cache=path) == costs
    assert CostModel.from_json(path.read_text()) == costs
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    def measuring(*args, **kwargs):
        raise AssertionError("measured again although the cache holds the model")

    monkeypatch.setattr("modhifi.prune.latency.measure_costs", measuring)
    assert measured_costs(model, analysis.structure, SHAPE, backend=cpu, batch_size=4,
                          cache=path) == costs
    path.write_text(json.dumps({"version": 0}))  # another layout: measured again and replaced
    monkeypatch.setattr("modhifi.prune.latency.measure_costs", lambda *a, **k: costs)
    assert measured_costs(model, analysis.structure, SHAPE, backend=cpu, batch_size=4,
                          cache=path) == costs
    assert CostModel.from_json(path.read_text()) == costs


def test_a_latency_target_without_a_cost_model_or_with_another_models_is_one_clear_error(
        measured, cpu):
    _, batches, analysis, costs = measured
    with pytest.raises(UserError, match="latency target needs the model's measured"):
        analysis.plan(0.3, target_kind="latency")
    for layers in ({**costs.layers, "nowhere": next(iter(costs.layers.values()))},
                   dict(list(costs.layers.items())[1:])):  # a layer too many, one too few
        with pytest.raises(UserError, match="another model"):
            analysis.plan(0.3, target_kind="latency",
                          costs=dataclasses.replace(costs, layers=layers))
    # the same layer names, twice as wide: the narrower model's grid would be read past its end
    wide = nets.ResNet(widths=(32, 64, 128)).eval()
    wider = analyse(wide, batches, device=torch.device("cpu"), input_shape=SHAPE)
    with pytest.raises(UserError, match="wider than it was timed"):
        wider.plan(0.3, target_kind="latency", costs=costs)


def test_one_measurement_at_a_time_and_a_waiting_one_reads_what_was_written(
        measured, tmp_path):
    """Two threads ask for one cost model file: one measures (holding the folder's lock, which
    another process's measurement also waits for), the other reads what it wrote."""
    from modhifi.prune.latency import cached

    costs = measured[3]
    path, calls, started = tmp_path / "net.latency.json", [], threading.Event()

    def measure() -> CostModel:
        calls.append(threading.current_thread().name)
        other = os.open(tmp_path, os.O_RDONLY)  # as another process would try
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        started.wait()  # the second thread has asked meanwhile
        return costs

    got = {}

    def ask(name: str) -> None:
        if name == "second":
            started.set()
        got[name] = cached(path, CostModel.from_json, measure)

    threads = [threading.Thread(target=ask, args=(n,), name=n) for n in ("first", "second")]
    threads[0].start()
    threads[1].start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and got["first"] == got["second"] == costs
    assert CostModel.from_json(path.read_text()) == costs


def test_an_override_keeps_its_share_when_blocks_are_given_back(measured):
    _, _, analysis, costs = measured
    synthetic = synthetic_costs(costs)
    first = next(g for g in analysis.structure.groups if g.size >= 32)
    plan = analysis.plan(0.3, target_kind="latency", costs=synthetic, overrides={first.name: 0.5})
    kept = {g.name: len(g.kept) for g in plan.groups}
    assert kept[first.name] == first.size // 2 and plan.achieved >= 0.3


def test_a_latency_target_holds_when_the_measured_pass_is_slower_than_planned(
        measured, cpu, monkeypatch):
    """A fake clock: every pruned model runs 15% slower than the synthetic cost model says (its
    time from its real layer widths), the dense one as said. The first cut falls short; each
    next plan asks for what the last predicted plus the shortfall, until the measured share
    meets the target."""
    from modhifi.backend import Timing
    from modhifi.metrics import Latency
    from modhifi.prune.hold import TOLERANCE, hold_latency

    model, _, analysis, costs = measured
    synthetic = synthetic_costs(costs, rest=0.5)

    def timing(ms: float) -> Timing:
        return Timing(ms, ms, ms, 30, 5)

    def fake(models, shape, *, backend, batch_size):
        dense, pruned = models
        slow = _explicit_ms(pruned, synthetic, 0.5) * 1.15
        return [Latency(batch_size, 1, "fake", timing(ms), timing(ms))
                for ms in (synthetic.dense_ms, slow)]

    monkeypatch.setattr("modhifi.prune.hold.measure_latencies", fake)
    with pytest.raises(UserError, match="measured at batch 4"):
        hold_latency(analysis, 0.3, costs=synthetic, backend=cpu, batch_size=64)
    held = hold_latency(analysis, 0.3, costs=synthetic, backend=cpu, batch_size=4)
    assert len(held.asked) >= 2 and held.asked[0] == 0.3
    assert held.removed >= 0.3 - TOLERANCE
    assert held.removed == pytest.approx(
        1 - 1.15 * _explicit_ms(held.model, synthetic, 0.5) / synthetic.dense_ms)
    assert held.plan.target == held.asked[-1] and held.plan.achieved >= held.asked[-1]
    assert held.planned == pytest.approx(
        1 - _explicit_ms(held.model, synthetic, 0.5) / synthetic.dense_ms)
    for before, after in zip(held.asked, held.asked[1:]):  # the last prediction + the shortfall
        first = analysis.apply(analysis.plan(before, target_kind="latency", costs=synthetic))
        planned = 1 - _explicit_ms(first, synthetic, 0.5) / synthetic.dense_ms
        short = 0.3 - (1 - 1.15 * _explicit_ms(first, synthetic, 0.5) / synthetic.dense_ms)
        assert after == pytest.approx(planned + short)


def test_a_depthwise_convolution_is_timed_at_its_output_widths_and_predicted_exactly(cpu):
    """MobileNet's kind of layer: a depthwise conv's input follows its output, so it is timed
    along the output alone (each copy fed as many channels as it has)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32),
                          nn.ReLU(), nn.Conv2d(32, 16, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10)).eval()
    batches = [torch.randn(16, *SHAPE)]
    analysis = analyse(model, batches, device=torch.device("cpu"), input_shape=SHAPE)
    costs = measure_costs(analysis.model, analysis.structure, SHAPE, backend=cpu, batch_size=2)
    assert costs.layers["3"].in_widths == (32,) and costs.layers["3"].out_widths == (
        8, 16, 24, 32)
    synthetic = synthetic_costs(costs, rest=0.5, depthwise=("3",))
    plan = analysis.plan(0.3, target_kind="latency", costs=synthetic)
    assert plan.latency_after_ms == pytest.approx(
        _explicit_ms(analysis.apply(plan), synthetic, 0.5))
    assert plan.achieved >= 0.3


def test_the_hold_loop_stops_when_nothing_more_can_be_asked_and_lists_every_try():
    """Plans that predict 0.05 more than asked and measure 0.5 less than predicted never meet
    0.3: the second try asks for all that can go (0.6), its plan predicts past it, and the loop
    ends there (no third cut of the same plan), returning the closest try with every target."""
    from modhifi.prune.hold import hold

    cuts = []

    def cut(asked):
        cuts.append(asked)
        return f"plan for {asked}", nn.Identity(), asked + 0.05, asked + 0.05 - 0.5

    held = hold(0.3, 0.6, cut, tries=3)
    assert cuts == [0.3, 0.6] and held.asked == (0.3, 0.6)
    assert held.plan == "plan for 0.6" and held.removed == pytest.approx(0.15)
    with pytest.raises(UserError, match="at least 1"):
        hold(0.3, 0.6, cut, tries=0)

    def worse(asked):  # the first cut comes closest; later ones measure less
        return f"plan for {asked}", nn.Identity(), asked + 0.01, 0.25 if asked == 0.3 else 0.1

    held = hold(0.3, 0.9, worse, tries=3)
    assert held.plan == "plan for 0.3" and held.removed == 0.25
    assert held.asked == pytest.approx((0.3, 0.36, 0.57))
