"""One forward pass, recorded: which modules ran, in what order, how often, on what inputs.

`forward_order` (the scorable layers in call order), `classifier_name` (the last Linear called),
the theory's layer walk and the replay of the modules before a layer (`modhifi.replay`) all read
it. The pass runs on a copy (`hooks.hooked`), so the model given is never hooked.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import count

import torch
from torch import Tensor, nn

from modhifi.batch import Batch, call
from modhifi.errors import UserError
from modhifi.hooks import hooked
from modhifi.moments import is_scorable


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
def trace_forward(model: nn.Module, example: Batch) -> Trace:
    """Record one forward pass of `model` on `example` (on a copy, in eval mode).

    Args:
        model: the network; only read.
        example: one input batch (of any form: `modhifi.batch`) on the model's device.

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
    with hooked(model, before={n: before(n) for n, _ in named},
                after={n: after(n) for n, _ in named}) as run:
        call(run, example)
    leaves = sorted((n for n, m in named if n in start and next(m.children(), None) is None),
                    key=start.get)
    return Trace(start, end, calls, shapes, tuple(leaves), frozenset(tensors))


def forward_order(model: nn.Module, example: Batch) -> list[str]:
    """Names of the scorable layers (Conv2d with groups=1, Linear) in the order they are called.

    Args:
        model: the network, in eval mode.
        example: one input batch, already on the model's device.

    Returns:
        Module names, each once, in the order of their first call.
    """
    return [name for name in trace_forward(model, example).in_call_order()
            if is_scorable(model.get_submodule(name))]


def last_linear(model: nn.Module, order: list[str]) -> str | None:
    """The last nn.Linear in `order` (a `forward_order`), or None when there is none."""
    linears = [name for name in order if isinstance(model.get_submodule(name), nn.Linear)]
    return linears[-1] if linears else None


def classifier_name(model: nn.Module, order: list[str]) -> str:
    """The final classifier: the last nn.Linear a forward pass calls.

    Args:
        model: the network.
        order: its `forward_order`.

    Returns:
        The classifier's module name.

    Raises:
        UserError (a ValueError): when no nn.Linear is called.
    """
    name = last_linear(model, order)
    if name is None:
        raise UserError("the model has no final nn.Linear classifier; one is needed to know "
                        "which layers come before it and which features it reads")
    return name
