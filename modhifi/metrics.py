"""Measurements of a model: accuracy (top-1, per class, confusion), MACs and parameters, latency.

MACs come from `torch.utils.flop_counter` (FLOPs / 2) for one input. Latency is timed the paper's
way (forward only, random input of the model's shape, warm-up, many repeats) both in eager mode
and on an inference-optimised copy (BatchNorm folded into convs, frozen TorchScript,
channels-last memory format), because
small models are dominated by Python overheads in eager mode.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.utils.flop_counter import FlopCounterMode

from modhifi.backend import Backend, Timing, time_side_by_side
from modhifi.data import Split


@dataclass(frozen=True)
class Evaluation:
    """Top-1 accuracy of a model on a split, overall and per class."""

    accuracy: float
    per_class: tuple[float, ...]
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class
    samples: int

    def to_frame(self, classes: tuple[str, ...]) -> pd.DataFrame:
        return pd.DataFrame({"class": classes, "accuracy": self.per_class})


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy for fast forward passes: BatchNorm folded into convs, channels-last.

    Same function as `model` up to float rounding; about 3× faster than eager NCHW on CPU for
    the zoo CNNs. Models that torch.fx cannot trace are only copied.
    """
    copied = copy.deepcopy(model).eval()
    try:
        copied = fuse(copied)
    except Exception:  # noqa: BLE001 - untraceable control flow: evaluate unfused
        pass
    return copied.to(memory_format=torch.channels_last)


@torch.inference_mode()
def predict(model: nn.Module, split: Split, *, device: torch.device,
            batch_size: int = 128) -> torch.Tensor:
    """Logits of every image of `split`, (N, num_classes), on the CPU."""
    fast = inference_copy(model)
    return torch.cat([fast(channels_last(x)).float().cpu()
                      for x in split.batches(batch_size, device=device)])


def evaluate(model: nn.Module, split: Split, *, device: torch.device,
             num_classes: int, batch_size: int = 128) -> Evaluation:
    """Top-1, per-class accuracy and the confusion matrix on every image of `split`."""
    predicted = predict(model, split, device=device, batch_size=batch_size).argmax(1)
    return evaluation_from(predicted, split.labels, num_classes=num_classes)


def evaluation_from(predicted: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> Evaluation:
    """Evaluation from predicted and true labels, both (N,)."""
    confusion = torch.bincount(labels * num_classes + predicted,
                               minlength=num_classes ** 2).view(num_classes, num_classes)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return Evaluation(accuracy=float((predicted == labels).float().mean()),
                      per_class=tuple(per_class.tolist()),
                      confusion=tuple(tuple(row) for row in confusion.tolist()),
                      samples=len(labels))


@dataclass(frozen=True)
class Cost:
    """MACs for one input and parameter count, in total and per layer."""

    macs: int
    params: int
    per_layer: tuple[tuple[str, int], ...]  # (module name, MACs) for layers that do work

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.per_layer, columns=["layer", "macs"])
        frame["share"] = frame["macs"] / max(self.macs, 1)
        return frame


def count_cost(model: nn.Module, input_shape: tuple[int, ...]) -> Cost:
    """MACs (FLOPs / 2) of one forward pass on a (1, *input_shape) input, and parameters."""
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(torch.zeros(1, *input_shape, device=device))
    per_module = counter.get_flop_counts()
    # FlopCounterMode keys submodules "<root class>.<dotted path>". Leaf modules only, so that
    # a block's MACs are not counted again under its children.
    root = type(model).__name__
    leaf_macs = ((name, sum(per_module.get(f"{root}.{name}", {}).values()) // 2)
                 for name, module in model.named_modules() if name and not list(module.children()))
    per_layer = tuple((name, int(macs)) for name, macs in leaf_macs if macs)
    return Cost(macs=int(counter.get_total_flops() // 2),
                params=sum(p.numel() for p in model.parameters()), per_layer=per_layer)


@dataclass(frozen=True)
class Latency:
    """Forward latency of one batch, eager and inference-optimised."""

    batch_size: int
    threads: int
    device: str
    eager: Timing
    optimised: Timing


def optimise_for_inference(model: nn.Module, example: torch.Tensor, *,
                           nhwc: bool = True) -> torch.jit.ScriptModule:
    """A frozen TorchScript copy of `model`, BatchNorm folded into the convs.

    With `nhwc` (channels-last) oneDNN / cuDNN pick their fastest convolution kernels; call the
    result with `channels_last(x)`. `nhwc=False` is the plain NCHW export papers usually time.
    """
    model = copy.deepcopy(model).eval()
    if nhwc:
        model, example = model.to(memory_format=torch.channels_last), channels_last(example)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice is not for our users
        return torch.jit.freeze(torch.jit.trace(model, example))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in NHWC memory order (other ranks unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, backend: Backend,
                    batch_size: int = 64, warmup: int = 5, repeats: int = 30) -> Latency:
    """Median forward time of a random (batch_size, *input_shape) batch, eager and optimised."""
    return measure_latencies([model], input_shape, backend=backend, batch_size=batch_size,
                             warmup=warmup, repeats=repeats)[0]


def measure_latencies(models: list[nn.Module], input_shape: tuple[int, ...], *, backend: Backend,
                      batch_size: int = 64, warmup: int = 5, repeats: int = 30) -> list[Latency]:
    """Latency of several models timed in alternation (side by side), eager and optimised."""
    example = torch.randn(batch_size, *input_shape, device=backend.device)
    fast = channels_last(example)
    eager = [lambda m=model.eval(): m(example) for model in models]
    optimised = [lambda m=optimise_for_inference(model, example): m(fast) for model in models]
    with torch.no_grad():
        timings = time_side_by_side(backend, eager + optimised, warmup=warmup, repeats=repeats)
    n = len(models)
    return [Latency(batch_size, backend.threads, backend.description, timings[i], timings[n + i])
            for i in range(n)]


@dataclass(frozen=True)
class Comparison:
    """A model before and after a modification, measured side by side in one run."""

    before: Evaluation
    after: Evaluation
    cost_before: Cost
    cost_after: Cost
    latency_before: Latency | None
    latency_after: Latency | None

    @property
    def speedup_macs(self) -> float:
        return self.cost_before.macs / max(self.cost_after.macs, 1)

    @property
    def speedup_measured(self) -> float | None:
        """Ratio of inference-optimised latencies (BatchNorm folded, frozen TorchScript)."""
        if self.latency_before is None:
            return None
        return self.latency_before.optimised.median_ms / self.latency_after.optimised.median_ms

    @property
    def speedup_eager(self) -> float | None:
        if self.latency_before is None:
            return None
        return self.latency_before.eager.median_ms / self.latency_after.eager.median_ms


def compare(before: nn.Module, after: nn.Module, *, dataset, backend: Backend,
            batch_size: int = 64, latency: bool = True, evaluation_before: Evaluation | None = None,
            repeats: int = 30) -> Comparison:
    """Accuracy on the full test split, MACs, params and (optionally) latency of two models."""
    def measure(model: nn.Module) -> Evaluation:
        return evaluate(model, dataset.test, device=backend.device, num_classes=dataset.num_classes)

    latencies = (measure_latencies([before, after], dataset.input_shape, backend=backend,
                                   batch_size=batch_size, repeats=repeats) if latency else [None, None])
    return Comparison(evaluation_before or measure(before), measure(after),
                      count_cost(before, dataset.input_shape), count_cost(after, dataset.input_shape),
                      *latencies)
