"""The one place forward hooks are registered, and the rule that makes them safe to share a model.

The dashboard hands one model object to every session at once. A hook on that object would see
every session's inputs, and `copy.deepcopy` carries hooks into copies, so one call's inputs would
land in another call's statistics. Hence: hooks only ever go on a copy that the calling function
alone holds, and `hooked` removes them when its block ends, whatever happens. A model given by a
caller is never hooked, put in another mode or moved.

Two kinds of copy: `private_copy` copies the weights too, for a call that edits them (surgery,
compensation, unlearning edits); `shared_copy` copies the modules and buffers but shares the
weights' storage, for a call that only hooks, traces or runs the model (its mode and its
BatchNorm statistics are its own): a large model is gigabytes of weights. Neither carries the
caller's own forward and backward hooks: they would see the library's internal passes, and
ride along in the models it returns.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple], object]          # (module, args) -> None or new args
PostHook = Callable[[nn.Module, tuple, object], object]  # (module, args, output) -> None or output


def private_copy(model: nn.Module, *, channels_last: bool = False) -> nn.Module:
    """A deep copy of `model` in eval mode, for one call's hooks, edits and mode changes.

    Args:
        model: any network; it is only read.
        channels_last: store 4-d weights channels-last (oneDNN's faster convolutions on a CPU,
            ~1.3-1.7x; the same results).

    Returns:
        The copy (same device and dtype).
    """
    copied = _unhooked(copy.deepcopy(model)).eval()
    return copied.to(memory_format=torch.channels_last) if channels_last else copied


def shared_copy(model: nn.Module, *, device: torch.device | str | None = None) -> nn.Module:
    """A copy of `model` in eval mode with its own modules, buffers and parameter objects whose
    tensors share the model's storage: for one call's hooks, traces and forward passes, without
    copying the weights. Moving it, converting it or accumulating gradients in it leaves the
    model alone; writing into its weights in place would not (`private_copy` is the copy to
    edit).

    Args:
        model: any network; it is only read.
        device: where the copy runs; parameters elsewhere are copied there (and only they).
    """
    place = None if device is None else torch.device(device)
    memo: dict[int, object] = {}  # tied weights stay tied: one new object per parameter
    for p in model.parameters():
        data = p.detach()
        if (place is not None and data.device != place) or data.is_inference():
            data = data.to(place or data.device, copy=True)  # moved, or usable by autograd
        memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    for b in model.buffers():  # BatchNorm statistics: a pass in train mode updates them
        memo[id(b)] = b.detach().to(place or b.device, copy=True)
    return _unhooked(copy.deepcopy(model, memo)).eval()


def _unhooked(copied: nn.Module) -> nn.Module:
    """`copied` (a deep copy: its hook tables are its own) without forward or backward hooks."""
    for module in copied.modules():
        for table in (module._forward_hooks, module._forward_hooks_with_kwargs,
                      module._forward_hooks_always_called, module._forward_pre_hooks,
                      module._forward_pre_hooks_with_kwargs, module._backward_hooks,
                      module._backward_pre_hooks):
            table.clear()
    return copied


@contextmanager
def hooked(model: nn.Module, *, before: Mapping[str, PreHook] | None = None,
           after: Mapping[str, PostHook] | None = None,
           private: bool = False) -> Iterator[nn.Module]:
    """Run a block with forward hooks on named modules; yields the model that carries them.

    Args:
        model: the network. Unless `private`, the hooks go on a `shared_copy` of it (yielded):
            the block may run it, in any mode, but never edits its weights.
        before: module name -> forward pre-hook.
        after: module name -> forward hook.
        private: `model` is already a copy made by the calling function (`private_copy` or
            `shared_copy`; never one a caller passed in or that a result hands out): hook it
            in place.

    Yields:
        The hooked model; call it inside the block. The hooks are gone when the block ends.
    """
    target = model if private else shared_copy(model)
    handles = []
    try:
        for name, hook in (before or {}).items():
            handles.append(target.get_submodule(name).register_forward_pre_hook(hook))
        for name, hook in (after or {}).items():
            handles.append(target.get_submodule(name).register_forward_hook(hook))
        yield target
    finally:
        for handle in handles:
            handle.remove()
