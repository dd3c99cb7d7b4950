"""Training of the zoo models, and of the references unlearning is compared to (the only place
in the library besides the audit that uses labels, and the only one that uses gradients).

Seeded, one-cycle schedule, light augmentation (random 2-pixel shifts, horizontal flips).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

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


# Initial weights (and dropout) come from torch's process-wide generator.
_GLOBAL_GENERATOR = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global CPU generator seeded with `seed` inside the block and put back as it was
    after it. One such block at a time, so two of them never interleave their draws; keep the
    block short (building a model): another thread drawing from the global generator meanwhile
    draws from the seeded stream."""
    with _GLOBAL_GENERATOR, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train(build: Callable[[], nn.Module], split: Split, *, config: TrainConfig,
          log: Callable[[str], None] = print) -> tuple[nn.Module, float]:
    """A new model from `build`, trained on `split` (on the CPU) from initial weights drawn with
    `config.seed`; returns it in eval mode and the training's wall time in seconds."""
    with seeded(config.seed):  # initial weights; the fit draws from its own generator
        model = build()
    with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
        return model, _fit(model, split, config=config, log=log)


def _fit(model: nn.Module, split: Split, *, config: TrainConfig,
         log: Callable[[str], None]) -> float:
    """Train `model` in place on `split`; returns the wall time in seconds."""
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
