"""More than one process (modhifi.distributed): 1, 2 and 3 CPU processes on this machine
(torchrun, gloo over loopback) give the one-process statistics, plan, recalibrated BatchNorm and
accuracy; the sums are checked against brute force on the whole data."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from modhifi import nets
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.prune import recalibrate_batchnorm
from oracles import cache_synthetic_costs, command_line, one_thread

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(processes: int, *args: str, timeout: int = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    # torchrun leaves a folder of its workers' logs in TMPDIR: one that goes with the run
    with tempfile.TemporaryDirectory() as logs:
        return subprocess.run([*TORCHRUN, f"--nproc-per-node={processes}", *args], cwd=ROOT,
                              env={**(env or ENV), "TMPDIR": logs}, capture_output=True,
                              text=True, timeout=timeout)


def failure(done: subprocess.CompletedProcess) -> str:
    """What the processes printed (first), not only torchrun's summary of who failed (last)."""
    return done.stderr[:2000] + "\n[...]\n" + done.stderr[-800:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """tests/distributed_worker.py run by 1, 2 and 3 processes: what process 0 saved. One
    process is this one, on the torchrun processes' one thread (a fresh one costs seconds of
    imports)."""
    import distributed_worker

    folder = tmp_path_factory.mktemp("distributed")
    saved = {}
    for processes in (1, 2, 3):
        out = folder / f"{processes}.pt"
        if processes == 1:
            with one_thread():
                distributed_worker.main(str(out))
        else:
            done = torchrun(processes, "tests/distributed_worker.py", str(out))
            assert done.returncode == 0, failure(done)
        saved[processes] = torch.load(out)
    return saved


def test_every_process_count_gives_the_same_statistics_plan_batchnorm_and_accuracy(runs):
    one = runs[1]
    for processes in (2, 3):
        many = runs[processes]
        assert many["world"] == processes
        for name, (second, means) in one["statistics"].items():
            other_second, other_means = many["statistics"][name]
            assert second.dtype == torch.float64
            assert torch.allclose(other_second, second, rtol=1e-10, atol=1e-14)
            assert (means is None) == (other_means is None)
            if means is not None:
                assert torch.allclose(other_means, means, rtol=1e-10, atol=1e-14)
        assert many["kept"] == one["kept"]  # the same channels, group by group
        for name, buffer in one["buffers"].items():  # recalibrated BatchNorm, to the bit
            assert torch.equal(many["buffers"][name], buffer), name
        for name, value in one["sequential"].items():  # the sequential refit's sums, shared
            for run in ("sequential", "uneven"):  # uneven: only some processes replay passes
                torch.testing.assert_close(many[run][name], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{run}: {name}")
        assert many["confusion"] == one["confusion"] and many["accuracy"] == one["accuracy"]


def test_the_summed_statistics_are_the_whole_datas(runs):
    """Oracle: the moments of every calibration image at once, in float64, by the worker's
    own data and model."""
    sys.path.insert(0, str(Path(__file__).parent))
    from distributed_worker import SHAPE, data

    from modhifi.moments import collect_moments

    torch.manual_seed(0)
    model = nets.ResNet(widths=(8, 16)).eval()
    calibration, _ = data()
    recalibrate_batchnorm(model, calibration)
    whole = collect_moments(model.double(), list(runs[1]["statistics"]),
                            [torch.cat(calibration).double()], device="cpu")
    samples = len(torch.cat(calibration))
    assert SHAPE == (1, 12, 12) and any(m is not None for _, m in runs[1]["statistics"].values())
    for processes, saved in runs.items():
        for name, (second, means) in saved["statistics"].items():
            assert torch.allclose(second, whole[name].second / samples, rtol=1e-5), (processes,
                                                                                     name)
            assert means is None or torch.allclose(means, whole[name].position_sum / samples,
                                                   rtol=1e-5, atol=1e-6), (processes, name)


class Reused(nn.Module):
    """A BatchNorm called twice in each forward pass, and one never called."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.unused = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.norm(self.norm(self.conv(x)))


def test_recalibration_is_the_mean_of_each_calls_statistics():
    """Oracle: per call of a BatchNorm (4-image passes, two calls each), the batch mean and
    unbiased variance of its input, averaged over the calls (what one process computes, and
    what every process adds to); a BatchNorm never called keeps its reset statistics."""
    torch.manual_seed(0)
    model = Reused().eval()
    batches = [torch.randn(10, 2, 6, 6), torch.randn(7, 2, 6, 6)]
    recalibrate_batchnorm(model, batches, chunk=4)
    inputs = []
    with torch.no_grad():
        for batch in batches:
            for part in batch.split(4):  # 3 + 2 passes
                y = model.conv(part)
                inputs.append(y)
                mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), keepdim=True,
                                                                   unbiased=False)
                inputs.append((y - mean) / (var + model.norm.eps).sqrt())  # weight 1, bias 0
    means = torch.stack([y.mean((0, 2, 3)) for y in inputs]).double()
    variances = torch.stack([y.var((0, 2, 3), unbiased=True) for y in inputs]).double()
    assert torch.allclose(model.norm.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.norm.running_var.double(), variances.mean(0), rtol=1e-5)
    assert int(model.norm.num_batches_tracked) == 10 and not model.norm.training
    assert torch.equal(model.unused.running_mean, torch.zeros(3))
    assert torch.equal(model.unused.running_var, torch.ones(3))


def test_a_shard_takes_whole_batches_in_turn():
    shard = Shard(rank=1, world=3)
    assert list(shard.take(range(8))) == [1, 4, 7]
    assert shard.indices(10, 3).tolist() == [3, 4, 5]  # batches 0-2, 3-5, 6-8, 9
    assert Shard(rank=0, world=3).indices(10, 3).tolist() == [0, 1, 2, 9]
    assert ALONE.indices(5, 2).tolist() == [0, 1, 2, 3, 4] and ALONE.is_main


def test_the_cli_prunes_with_three_processes_as_with_one(tmp_path, monkeypatch, capsys):
    """`torchrun -m modhifi prune` to a latency target (two rounds, each planned alike on every
    process from the cost model process 0 reads from the cache and hands on) and `info`: the
    same JSON as one process (timings aside), printed once; the pruned model written once, by
    process 0, and it reloads."""
    command = ["prune", "--model", "digits-cnn", "--target", "0.15", "--target-kind", "latency",
               "--steps", "2", "--json"]
    monkeypatch.setenv("MODHIFI_CACHE", str(tmp_path / "cache"))
    with one_thread():  # the torchrun processes' one thread (ENV), which the cache file names
        # a synthetic cost model where the command looks: the plans do not depend on the
        # machine's load (`oracles.cache_synthetic_costs`)
        cache_synthetic_costs("digits-cnn", 64)
        alone = command_line(capsys, *command, "--out", str(tmp_path / "pruned1.pt"))
    [costs] = (tmp_path / "cache" / "latency").iterdir()
    synthetic = costs.read_text()
    assert alone.returncode == 0, alone.stderr
    out = tmp_path / "pruned3.pt"
    done = torchrun(3, "-m", "modhifi", *command, "--out", str(out),
                    env={**ENV, "MODHIFI_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, failure(done)
    results = {}
    for processes, printed in ((1, alone.stdout), (3, done.stdout)):
        lines = printed.strip().splitlines()
        assert len(lines) == 1  # one voice
        results[processes] = json.loads(lines[0])
        assert (tmp_path / f"pruned{processes}.pt").is_file()
    # read as written by every run (a measured one would have replaced it)
    assert list(costs.parent.iterdir()) == [costs] and costs.read_text() == synthetic
    timed = ("latency_ms_before", "latency_ms_after", "speedup_measured", "speedup_eager",
             "latency_target_met", "seconds", "device")  # met: judged by the measurement
    for key, value in results[1].items():
        if key not in timed:
            assert results[3][key] == value, key
    assert results[1]["speedup_planned"] >= 1 / 0.85 - 1e-9
    with one_thread():
        reloaded = command_line(capsys, "info", "--model", str(out), "--json")
    assert json.loads(reloaded.stdout)["accuracy"] == results[1]["accuracy_after"]
    info = torchrun(2, "-m", "modhifi", "info", "--model", "digits-cnn", "--json")
    assert json.loads(info.stdout)["accuracy"] == results[1]["accuracy_before"]


def shared_and_alone(capsys, processes: int, *command: str) -> tuple[dict, dict]:
    """The JSON of `modhifi COMMAND --json` under torchrun (one line, from process 0) and from
    one process on one thread, as each torchrun process (this one: `oracles.command_line`); the
    command is one whose work the processes share."""
    many = torchrun(processes, "-m", "modhifi", *command, "--json")
    assert many.returncode == 0, failure(many)
    assert "runs in process 0 alone" not in many.stderr
    with one_thread():
        one = command_line(capsys, *command, "--json")
    assert one.returncode == 0, one.stderr
    lines = many.stdout.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0]), json.loads(one.stdout)


def test_unlearning_shares_its_statistics_and_prints_the_one_process_result(capsys):
    """`unlearn` with 3 processes: the forget-class statistics read in shares and summed give
    the one-process k, layers and audit (the search and the audit run alike everywhere)."""
    shared, alone = shared_and_alone(capsys, 3, "unlearn", "--model", "digits-cnn",
                                     "--forget-class", "3")
    assert {k: v for k, v in shared.items() if k != "seconds"} == {
        k: v for k, v in alone.items() if k != "seconds"}


def test_a_command_that_shares_no_work_runs_on_process_0_alone(capsys):
    many = torchrun(2, "-m", "modhifi", "models", "--json")
    assert many.returncode == 0 and "runs in process 0 alone" in many.stderr
    one = command_line(capsys, "models", "--json")  # one process: this one
    assert one.returncode == 0
    assert many.stdout == one.stdout and len(one.stdout.strip().splitlines()) == 1


def test_too_few_calibration_batches_for_the_processes_is_one_line():
    too_few = torchrun(2, "-m", "modhifi", "prune", "--model", "digits-cnn", "--target", "0.3",
                       "--calib-samples", "100")
    assert too_few.returncode != 0 and ("modhifi: error: 100 calibration images make too few "
                                        "batches of 128 for 2 processes: give --calib-samples at "
                                        "least 130, or start fewer") in too_few.stderr
    assert too_few.stderr.count("modhifi: error:") == 1  # process 0 says it for all


@pytest.mark.parametrize("world, samples, advice", [
    (2, 100, "give --calib-samples at least 130"),  # 129 makes one batch of 129: no lone image
    (3, 257, "give --calib-samples at least 258"),
    (4, 300, "the dataset has 300, enough for 3"),  # not "at least 385": there are not so many
])
def test_the_least_calibration_images_advised_make_a_batch_for_every_process(world, samples,
                                                                             advice):
    from modhifi.distributed import calibration_batches

    shard = Shard(rank=0, world=world)
    with pytest.raises(UserError, match=advice) as refused:
        shard.check_batches(samples, 300)
    least = str(refused.value).rsplit("at least ", 1)[-1].split(",")[0]
    if least.isdigit():
        assert calibration_batches(int(least)) >= world > calibration_batches(int(least) - 1)
        shard.check_batches(int(least), 300)  # the advice is taken


def test_the_theory_report_shares_its_statistics_and_global_errors(capsys):
    """`theory` with 2 processes (digits: 300 calibration images, batches of 128): moments and
    measured output errors summed over both give the one-process local and global errors, to
    float64 rounding, and the same HiFi shares (the untrained architecture on every process)."""
    shared, alone = shared_and_alone(capsys, 2, "theory", "--model", "digits-cnn")
    for key in ("hifi_share", "hifi_share_untrained", "calib_samples"):
        assert shared[key] == alone[key]
    assert [row["layer"] for row in shared["layers"]] == [row["layer"] for row in alone["layers"]]
    for a, b in zip(shared["layers"], alone["layers"]):
        for key in ("local_error", "global_error"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), (a["layer"], key)
