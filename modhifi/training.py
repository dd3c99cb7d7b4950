"""Training of the zoo models (the only place in the library that uses labels and gradients).

Seeded, one-cycle schedule, light augmentation (random 2-pixel shifts, horizontal flips).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modhifi.data import Split


@dataclass(frozen=True)
class TrainConfig:
    """How a zoo model is trained."""

    epochs: int
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1            # peak of the one-cycle schedule
    weight_decay: float = 5e-4
    batch_size: int = 128
    shift: int = 2             # random translation in pixels (0 = none)
    flip: bool = True          # random horizontal flips
    seed: int = 0


def augment(images: torch.Tensor, *, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random per-image shifts (zero padding) and flips of a (B, C, H, W) batch."""
    b, _, h, w = images.shape
    if shift:
        padded = F.pad(images, (shift,) * 4)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, b, 1), generator=generator)
        rows = (dy + torch.arange(h))[:, None, :, None]         # (B, 1, H, 1)
        cols = (dx + torch.arange(w))[:, None, None, :]         # (B, 1, 1, W)
        images = padded[torch.arange(b)[:, None, None, None],
                        torch.arange(images.shape[1])[None, :, None, None], rows, cols]
    if flip:
        mirrored = torch.rand(b, generator=generator) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    return images


def train(model: nn.Module, split: Split, *, config: TrainConfig,
          log: Callable[[str], None] = print) -> float:
    """Train `model` in place on `split`; returns the wall time in seconds."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(split) // config.batch_size)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                      weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(split), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for begin in range(0, len(split), config.batch_size):
            index = order[begin:begin + config.batch_size]
            images = augment(split.images[index], shift=config.shift, flip=config.flip,
                             generator=generator)
            logits = model(split.normalise(images))
            loss = F.cross_entropy(logits, split.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += len(index)
            correct += int((logits.argmax(1) == split.labels[index]).sum())
            loss_sum += loss.item() * len(index)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / total:.4f}, "
            f"train accuracy {correct / total:.4f}, {time.perf_counter() - start:.0f} s")
    model.eval()
    for parameter in model.parameters():
        parameter.grad = None
    return time.perf_counter() - start
