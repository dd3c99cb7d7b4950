"""modhifi.bench: the sweep that `bench --quick`, the slider timing and the dashboard's accuracy
against sparsity curve share gives what the spelled-out plan, apply and evaluate give."""
import torch

from conftest import subject

from modhifi import bench
from modhifi.metrics import evaluate
from modhifi.requests import PruneRequest


def test_the_sweep_equals_plan_apply_evaluate_one_request_at_a_time(cpu):
    chosen = subject("digits-cnn")
    data = chosen.dataset
    study = bench.live_analysis(chosen.loaded.model, data, backend=cpu, samples=250)
    live = data.test.subset(slice(0, 300))
    requests = [PruneRequest(target=0.5, target_kind="macs"),
                PruneRequest(target=0.3, method="l1", recalibrate=False)]
    reported = []
    points = list(bench.sweep(study, requests, live, backend=cpu, num_classes=data.num_classes,
                              progress=reported.append))
    assert reported == [0.5, 1.0]
    assert [p.request for p in points] == requests
    for point, (target, options, compensation, recalibrate) in zip(points, [
            (0.5, {"target_kind": "macs"}, "refit", True), (0.3, {"method": "l1"}, "none", False)]):
        plan = study.plan(target, **options)
        model = study.apply(plan, compensation=compensation, recalibrate=recalibrate)
        expected = evaluate(model, live, device=torch.device("cpu"), num_classes=data.num_classes)
        assert point.plan == plan
        assert point.accuracy == expected.accuracy
        assert point.seconds > 0
        row = point.to_row()
        assert row["macs_reduction"] == plan.speedup_macs and row["compensation"] == compensation
