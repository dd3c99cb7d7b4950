"""The scoring backend: the device, chosen once and passed down, and how to time code on it.

This is the only module that knows about CUDA. Everything else takes a `Backend` (or its
`device`) and runs the same code on the GPU or the CPU.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from modhifi.errors import UserError
from modhifi.options import DeviceChoice, check



@dataclass(frozen=True)
class Backend:
    """Where heavy math runs: a torch device and a human-readable description."""

    device: torch.device
    description: str
    threads: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        """Wait for queued kernels so that wall-clock reads are honest."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def random(self, *shape: int) -> torch.Tensor:
        """Standard-normal numbers of `shape` on this device, for timing inputs: drawn from a
        generator of their own (the process-wide one is left alone: other sessions may be
        drawing from it, or have seeded it to build a model)."""
        generator = torch.Generator(self.device).manual_seed(0)
        return torch.randn(*shape, generator=generator, device=self.device)

    def build(self, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """`make()` on this device, for timing: its parameters seeded random numbers of a
        generator of their own (a module's constructor draws its initial weights from the
        process-wide one, which other sessions may be drawing from or have seeded)."""
        with torch.device("meta"):
            module = make()
        module = module.to_empty(device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.02, generator=generator)
        return module

    def peak_memory_reset(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory since the last reset (None on the CPU, where torch has no counter)."""
        return torch.cuda.max_memory_allocated(self.device) if self.is_cuda else None


def quiet_dependency_warnings() -> None:
    """Hide the dependencies' notices that are not for our users, for the whole process: a
    TorchScript deprecation (latency is timed on frozen TorchScript on purpose), Torch-Pruning's
    depth limit on shape inference (the groups it affects are left whole), scikit-learn's
    convergence notice for the audit's linear probe (a near-optimum is enough), and the text
    models' loader's weight-loading bars and reports of shapes we restore.

    Process-wide, so only applications call it, once at start (the CLI, the dashboard); the
    library itself never changes warning filters (`warnings.catch_warnings` is not thread-safe).
    It imports neither scikit-learn nor transformers (a second or two of every command that
    never uses them): the first is matched by its message, the second's switches are the
    environment variables it reads when first imported (unless it is in memory already).
    """
    import sys
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
    warnings.filterwarnings("ignore", message=r".*failed to converge", category=UserWarning,
                            module=r"sklearn\.")  # a ConvergenceWarning
    quiet = os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error") == "error"
    no_bars = os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") == "1"  # a user's wins
    if any(name in sys.modules for name in ("transformers", "huggingface_hub")):  # read already
        from transformers.utils import logging as transformers_logging

        if quiet:
            transformers_logging.set_verbosity_error()
        if no_bars:
            transformers_logging.disable_progress_bar()


def choose_backend(choice: DeviceChoice = "auto") -> Backend:
    """Pick the device once: `auto` means CUDA when present, else the CPU.

    Raises UserError when `cuda` is asked for on a machine without one.
    """
    check(DeviceChoice, choice)
    threads = torch.get_num_threads()
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device auto or cpu")
    if choice != "cpu" and torch.cuda.is_available():
        # Under torchrun, each process on the node takes the GPU of its LOCAL_RANK (unless it
        # sees one GPU only, as a scheduler giving each task its own GPU arranges).
        local = int(os.environ.get("LOCAL_RANK", "-1"))
        index = local if 0 <= local < torch.cuda.device_count() else torch.cuda.current_device()
        device = torch.device("cuda", index)
        return Backend(device, f"GPU: {torch.cuda.get_device_name(device)}", threads)
    plural = "s" if threads > 1 else ""
    return Backend(torch.device("cpu"), f"CPU: {threads} thread{plural}", threads)


@dataclass(frozen=True)
class Timing:
    """Wall time of repeated calls, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int


def time_calls(backend: Backend, fn: Callable[[], object], *, warmup: int = 5,
               repeats: int = 30) -> Timing:
    """Time `fn()` the paper's way: warm-up, then many repeats; median and spread."""
    return time_side_by_side(backend, [fn], warmup=warmup, repeats=repeats)[0]


def time_side_by_side(backend: Backend, fns: Sequence[Callable[[], object]], *, warmup: int = 5,
                      repeats: int = 30) -> list[Timing]:
    """Time several functions in alternation, so that machine noise hits all of them alike.

    CUDA events on the GPU (kernel time without host jitter), `perf_counter` on the CPU.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    backend.synchronize()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            times.append(_elapsed_ms(backend, fn))
    return [_summary(times, warmup) for times in samples]


def _elapsed_ms(backend: Backend, fn: Callable[[], object]) -> float:
    if backend.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(backend.device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def percentile(samples: Sequence[float], share: float) -> float:
    """The `share` quantile of the samples, interpolated linearly between them, so never outside
    their range (statistics.quantiles' default method extrapolates: a p10 latency of −0.33 ms
    was once reported)."""
    if not len(samples):
        raise ValueError("no samples to take a percentile of")
    return float(np.percentile(samples, 100 * share))


def _summary(samples: list[float], warmup: int) -> Timing:
    return Timing(statistics.median(samples), percentile(samples, 0.1), percentile(samples, 0.9),
                  len(samples), warmup)
