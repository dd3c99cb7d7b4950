"""The latency cost model of a text encoder's components, behind latency targets on text: one
FFN block timed alone at candidate neuron counts and one attention block at every head count,
and the whole encoder once, on batches like those its speed is measured on.

Every layer of a BERT-style encoder has the same shape, so one FFN and one attention block
stand for all of them (the image cost model, `prune.latency`, times each layer). The batches are
the first `2 × batch_size` texts given (the calibration quotations), sorted by length and padded
to each batch's longest, as `text.quality.sentences_per_second` batches the test quotations it
times the dense and pruned encoders on.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modhifi.backend import Backend, time_side_by_side
from modhifi.options import Component
from modhifi.prune.latency import (REPEATS, LayerTimes, cached, candidate_widths, from_json,
                                   to_json)
from modhifi.text.encoder import token_batches, transformer_layers

BATCHES = 2  # batches of texts timed, as `sentences_per_second` times them


@dataclass(frozen=True)
class TextCosts:
    """An encoder's measured time per pass over its timing batches, and one layer's FFN and
    attention block by components kept (in_widths unused: one row)."""

    device: str
    batch_size: int
    shapes: tuple[tuple[int, int], ...]  # (texts, padded tokens) of each timed batch
    dense_ms: float
    ffn: LayerTimes    # one FFN block (up, activation, down) by neurons kept
    heads: LayerTimes  # one attention block (q, k, v, scores, output) by heads kept
    seconds: float = 0.0

    def predict(self, kind: Component, kept: Sequence[int]) -> float:
        """Milliseconds per pass once layer i keeps `kept[i]` components of `kind` (the other
        kind whole): the dense time less each layer's saving."""
        times = self.ffn if kind == "ffn" else self.heads
        full = times.out_widths[-1]
        return self.dense_ms - sum(times.at(1, full) - times.at(1, count) for count in kept)

    def to_json(self) -> str:
        return to_json(self)

    @classmethod
    def from_json(cls, text: str) -> TextCosts:
        state = from_json(text)
        blocks = {kind: LayerTimes.from_state(state.pop(kind)) for kind in ("ffn", "heads")}
        return cls(shapes=tuple(map(tuple, state.pop("shapes"))), **blocks, **state)


class _FeedForward(nn.Module):
    def __init__(self, hidden: int, neurons: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, neurons), nn.Linear(neurons, hidden)

    def forward(self, x):  # (B, T, hidden)
        return self.down(F.gelu(self.up(x)))


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, head_size: int):
        super().__init__()
        self.heads, self.head_size = heads, head_size
        self.qkv = nn.ModuleList(nn.Linear(hidden, heads * head_size) for _ in range(3))
        self.out = nn.Linear(heads * head_size, hidden)

    def forward(self, x):  # (B, T, hidden)
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_size).transpose(1, 2) for p in self.qkv)
        mixed = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_size)
        return self.out(mixed.transpose(1, 2).reshape(b, t, -1))


def timing_batches(model: nn.Module, texts: Sequence[str], *, batch_size: int,
                   device: torch.device | str) -> list[dict]:
    """The token batches a cost model times: the first `BATCHES × batch_size` texts."""
    return [features for _, features in token_batches(model, list(texts[:BATCHES * batch_size]),
                                                      batch_size=batch_size, device=device)]


def shapes_of(batches: Sequence[dict]) -> tuple[tuple[int, int], ...]:
    """(texts, padded tokens) of each batch."""
    return tuple(tuple(features["input_ids"].shape) for features in batches)


@torch.no_grad()
def _time_blocks(blocks: Sequence[nn.Module], inputs: Sequence[torch.Tensor], *,
                 backend: Backend) -> tuple[float, ...]:
    """Median ms of each block over every input, the blocks in alternation."""
    calls = [lambda block=block: [block(x) for x in inputs] for block in blocks]
    return tuple(t.median_ms for t in time_side_by_side(backend, calls, warmup=1,
                                                        repeats=REPEATS))


def measure_text_costs(model: nn.Module, texts: Sequence[str], *, backend: Backend,
                       batch_size: int = 64) -> TextCosts:
    """Time the encoder on the first `BATCHES × batch_size` texts, and one FFN and one attention
    block of its shape on the same batches at candidate component counts.

    Args:
        model: a sentence-transformers BERT-style encoder on `backend`'s device (only read).
        texts: the texts whose lengths the timing batches take.
        batch_size: texts per timed batch, as the latency target means it.
    """
    start = time.perf_counter()
    layer = transformer_layers(model)[0]
    up = model.get_submodule(layer.ffn_up)
    hidden, neurons = up.in_features, up.out_features
    heads = model.get_submodule(layer.query).out_features // layer.head_size
    work = timing_batches(model, texts, batch_size=batch_size, device=backend.device)
    shapes = shapes_of(work)
    inputs = [backend.random(b, t, hidden) for b, t in shapes]
    with torch.inference_mode():
        dense, = time_side_by_side(backend, [lambda: [model(dict(f)) for f in work]],
                                   warmup=1, repeats=REPEATS)
    counts = candidate_widths(neurons)
    ffn = _time_blocks([backend.build(partial(_FeedForward, hidden, n)).eval() for n in counts],
                       inputs, backend=backend)
    every = tuple(range(1, heads + 1))
    attention = _time_blocks([backend.build(partial(_Attention, hidden, h, layer.head_size))
                              .eval() for h in every], inputs, backend=backend)
    return TextCosts(backend.description, batch_size, shapes, dense.median_ms,
                     LayerTimes((1,), counts, (ffn,), 0), LayerTimes((1,), every, (attention,), 0),
                     time.perf_counter() - start)


def measured_text_costs(model: nn.Module, texts: Sequence[str], *, backend: Backend,
                        batch_size: int = 64, cache: Path | None = None,
                        progress: Callable[[str], None] = lambda line: None) -> TextCosts:
    """`measure_text_costs`, read from the file `cache` when it holds them for the same timing
    batches (another corpus or tokenizer gives others: measured again), else measured and
    written there (`prune.latency.cached`, which tells `progress` which)."""
    shapes = shapes_of(timing_batches(model, texts, batch_size=batch_size, device="cpu"))

    def read(text: str) -> TextCosts:
        costs = TextCosts.from_json(text)
        if costs.shapes != shapes:
            raise ValueError("timed on other batches")
        return costs

    return cached(cache, read,
                  lambda: measure_text_costs(model, texts, backend=backend, batch_size=batch_size),
                  progress=progress, how="timing one FFN and one attention block")
