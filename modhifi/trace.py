"""One forward pass, recorded: which modules ran, in what order, how often, on what inputs.

The single place that hooks every module of a model for one pass. `fidelity.forward_order` (the
scorable layers in call order), the theory's layer walk and ModHiFi-U's replay of the modules
before an edit all read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import count

import torch
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class Trace:
    """Call order, call counts and the input shape of every module in one forward pass."""

    start: dict[str, int]  # name -> event number of its first call's start
    end: dict[str, int]    # name -> event number of its first call's end
    calls: dict[str, int]
    shapes: dict[str, tuple[int, ...]]  # first input without the batch dim
    leaves: tuple[str, ...]  # modules without children that ran, in forward order
    returns_tensor: frozenset[str]  # modules whose first call returned a single Tensor

    def in_call_order(self) -> list[str]:
        """Every module that ran, in the order its first call started."""
        return sorted(self.start, key=self.start.get)


@torch.inference_mode()
def trace_forward(model: nn.Module, example: Tensor) -> Trace:
    """Record one forward pass of `model` on `example` (hooks are added and removed).

    Args:
        model: the network, in eval mode.
        example: one input batch on the model's device.

    Returns:
        The `Trace`.
    """
    events = count()
    start, end, calls, shapes, tensors = {}, {}, {}, {}, set()

    def before(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            start.setdefault(name, next(events))
            if args and isinstance(args[0], Tensor):
                shapes.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    def after(name):
        def hook(module, args, output):
            if name not in end and isinstance(output, Tensor):
                tensors.add(name)
            end.setdefault(name, next(events))
        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [h for n, m in named for h in (m.register_forward_pre_hook(before(n)),
                                             m.register_forward_hook(after(n)))]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    leaves = sorted((n for n, m in named if n in start and next(m.children(), None) is None),
                    key=start.get)
    return Trace(start, end, calls, shapes, tuple(leaves), frozenset(tensors))
