"""Model inputs of any form: one tensor, a tuple of them, or a dict of them (token ids with an
attention mask, say). The one place that knows how to move, call, slice and check such a batch.

A dict is passed as keyword arguments, a tuple or list as positional ones, a tensor alone; every
tensor's first axis is the batch axis.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor, nn

Batch = Union[Tensor, tuple, list, Mapping]


def _apply(batch: Batch, fn) -> Batch:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _apply(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_apply(v, fn) for v in batch)
    return batch  # plain values (flags, sizes) pass unchanged


def tensors(batch: Batch) -> list[Tensor]:
    """Every tensor of the batch."""
    found: list[Tensor] = []
    _apply(batch, lambda t: found.append(t) or t)
    return found


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return _apply(batch, lambda t: t.to(device))


def clone(batch: Batch) -> Batch:
    """A copy of every tensor (made outside inference mode, one autograd can record)."""
    return _apply(batch, torch.clone)


def head(batch: Batch, rows: int) -> Batch:
    """The first `rows` samples of every tensor."""
    return _apply(batch, lambda t: t[:rows])


def size(batch: Batch) -> int:
    """Samples in the batch (the first axis of its first tensor)."""
    found = tensors(batch)
    return len(found[0]) if found else 0


def finite(batch: Batch) -> bool:
    """No NaN or infinity in any floating-point tensor (token ids and masks are not checked)."""
    return all(torch.isfinite(t).all() for t in tensors(batch) if t.is_floating_point())


def call(model: nn.Module, batch: Batch):
    """model(batch), model(*batch) or model(**batch), by the batch's form."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def example_of(shape_or_example, device: torch.device | str = "cpu") -> Batch:
    """A one-sample example input: zeros of `(1, *shape)` for an input shape (a tuple of ints),
    else the given example itself, on `device`."""
    if isinstance(shape_or_example, (tuple, list)) and all(
            isinstance(n, int) for n in shape_or_example):
        return torch.zeros(1, *shape_or_example, device=device)
    return to_device(shape_or_example, device)
