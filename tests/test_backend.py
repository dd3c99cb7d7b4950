"""The backend: one device choice, clear errors, honest timing."""
import pytest
import torch

from modhifi.backend import choose_backend, time_calls
from modhifi.errors import UserError


def test_auto_picks_cuda_only_when_present():
    chosen = choose_backend("auto")
    assert chosen.is_cuda == torch.cuda.is_available()
    assert choose_backend("cpu").device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        choose_backend("cuda")


def test_unknown_device_is_refused():
    with pytest.raises(UserError, match="unknown device"):
        choose_backend("tpu")


def test_time_calls_counts_repeats_and_warmup(cpu):
    calls = []
    timing = time_calls(cpu, lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and timing.repeats == 5 and timing.warmup == 2
    assert 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms


def test_percentiles_never_leave_the_range_of_the_samples():
    """statistics.quantiles' default (exclusive) method put p10 of [1, 2, 3] at 0.4."""
    from modhifi.backend import percentile

    assert percentile([1.0, 2.0, 3.0], 0.1) == pytest.approx(1.2)
    assert percentile([1.0, 2.0, 3.0], 0.95) == pytest.approx(2.9)
    assert percentile([5.0], 0.5) == 5.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_times_with_events():
    gpu = choose_backend("cuda")
    x = torch.randn(512, 512, device=gpu.device)
    assert time_calls(gpu, lambda: x @ x, warmup=1, repeats=3).median_ms > 0
