"""Record the part of a network before a layer once, then replay it.

Changing a layer (masking its inputs, editing its weights) leaves everything that finishes before
the layer starts unchanged, so many variants of the same inputs need only the rest of the network
run again. `Replay` keeps a private copy of the model, records the outputs of the outermost
modules that finish before each chosen layer (`prefix_modules`) on one clean pass over fixed
inputs, and inside `Replay.before(layer)` those modules return their recorded rows instead of
running. Used by ModHiFi-U's search of k (`modhifi.unlearn.search`) and by the theory's global
errors (`modhifi.theory.local_global`).

The replayed modules are swapped out only by an instance attribute `forward` on the private copy,
set and removed by `before`; the model given is never touched, and attribute reads of the
replayed modules (a parent reading a child's weight, say) still work.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from modhifi.hooks import hooked, private_copy
from modhifi.trace import Trace, trace_forward

_NOISE = 100.0  # scale of the random outputs that tell which recordings are read later


def prefix_modules(trace: Trace, layer: str) -> tuple[str, ...]:
    """The outermost modules that run once, return one tensor and finish before `layer` starts.

    Their outputs do not depend on anything `layer` or a later module does.
    """
    if trace.calls.get(layer) != 1:
        return ()  # a layer that runs several times (or never) has no fixed prefix
    begin = trace.start[layer]
    done = {name for name, end in trace.end.items()
            if end < begin and trace.calls[name] == 1 and name in trace.returns_tensor}

    def has_done_ancestor(name: str) -> bool:
        return any(name.rsplit(".", j)[0] in done for j in range(1, name.count(".") + 1))

    return tuple(name for name in sorted(done, key=trace.end.get) if not has_done_ancestor(name))


class Replay:
    """A private copy of a model whose prefix before a layer can return recorded outputs.

    Args:
        model: the network, in eval mode; only read (the replay runs on a private copy, `model`
            below, which the caller may edit after the prefix, e.g. its weights).
        inputs: (N, ...) the fixed inputs, on the model's device.
        layers: the layers whose prefixes are recorded.
        batch_size: inputs per forward pass while recording (the clean `logits` come in these
            batches: run the same batches to compare exactly).
        channels_last: make the private copy channels-last (`hooks.private_copy`).
        max_bytes: the most recorded activations kept; past it nothing is recorded and `before`
            runs whole forward passes.

    Attributes:
        model: the private copy that runs.
        trace: its recorded forward pass (`modhifi.trace`).
        logits: (N, K) the clean outputs of the whole model on `inputs`.
    """

    def __init__(self, model: nn.Module, inputs: Tensor, layers: Iterable[str], *,
                 batch_size: int, channels_last: bool = False, max_bytes: int = 2**30):
        self.model = private_copy(model, channels_last=channels_last)
        self.inputs = inputs
        self.trace = trace = trace_forward(self.model, inputs[:1])
        self._prefix = {layer: prefix_modules(trace, layer) for layer in layers}
        names = sorted(set().union(*self._prefix.values()), key=trace.end.get)
        self._outputs: dict[str, Tensor] = {}
        self._spare: dict[str, Tensor] = {}  # unread outputs: one buffer each, values unused
        self.logits = self._record(names, batch_size, max_bytes)
        self._read = {layer: self._read_later(layer) for layer in self._prefix}
        for name in self._outputs:  # recordings no layer reads again: keep one row for the shape
            if not any(name in read for read in self._read.values()):
                self._outputs[name] = self._outputs[name][:1].clone()

    @torch.inference_mode()
    def _record(self, names: list[str], batch_size: int, max_bytes: int) -> Tensor:
        recorded: dict[str, list[Tensor]] = {name: [] for name in names}

        def keep(name: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                if name in recorded:  # (not once over the budget)
                    recorded[name].append(output)
            return hook

        logits = []
        with hooked(self.model, after={name: keep(name) for name in names}, private=True) as run:
            for start in range(0, len(self.inputs), batch_size):
                logits.append(run(self.inputs[start:start + batch_size]))
                per_input = sum(r[0][0].numel() * r[0].element_size() for r in recorded.values())
                if start == 0 and per_input * len(self.inputs) > max_bytes:
                    recorded.clear()
                    self._prefix = {layer: () for layer in self._prefix}
        self._outputs = {name: torch.cat(parts) for name, parts in recorded.items()}
        return torch.cat(logits)  # (N, K)

    def prefix(self, layer: str) -> tuple[str, ...]:
        """The modules `before(layer)` replays."""
        return self._prefix[layer]

    @torch.inference_mode()
    def _read_later(self, layer: str) -> frozenset[str]:
        """The prefix modules of `layer` whose recorded outputs the rest of the network reads.

        A module is unread when large random outputs in its place (alone, then all unread ones
        together) leave the logits of a few inputs exactly as they were: e.g. every block of a
        ViT but the last before `layer`, whose outputs only the replayed next block would read.
        """
        index = torch.arange(min(4, len(self.inputs)), device=self.inputs.device)
        prefix = self.prefix(layer)
        with self._installed(layer, frozenset(prefix)) as run:
            expected = run(index)
        unread = [name for name in prefix
                  if self._same(layer, frozenset(prefix) - {name}, index, expected)]
        if not self._same(layer, frozenset(prefix) - set(unread), index, expected):
            unread = []  # they matter together
        return frozenset(prefix) - set(unread)

    def _same(self, layer: str, copied: frozenset[str], index: Tensor, expected: Tensor) -> bool:
        with self._installed(layer, copied, noise=True) as run:
            return torch.equal(run(index), expected)

    @contextmanager
    def before(self, layer: str) -> Iterator[Callable[[Tensor], Tensor]]:
        """A block in which `run(index)` returns the logits of `inputs[index]` with the prefix of
        `layer` replayed (an unrecorded prefix runs whole forward passes)."""
        with self._installed(layer, self._read[layer]) as run:
            yield run

    @contextmanager
    def _installed(self, layer: str, copied: frozenset[str], *,
                   noise: bool = False) -> Iterator[Callable[[Tensor], Tensor]]:
        """Replay the prefix of `layer`: modules in `copied` return their recorded rows, the
        others a tensor of the right shape whose values nothing reads (random when `noise`)."""
        rows: list[Tensor] = []  # the running call's input indices

        def replayed(name: str) -> Callable[..., Tensor]:
            recorded = self._outputs[name]  # (N, ...)

            def forward(*args, **kwargs) -> Tensor:
                if name in copied:
                    return recorded[rows[-1]]  # a copy: in-place ops downstream are harmless
                shape = (len(rows[-1]), *recorded.shape[1:])
                if noise:
                    return _NOISE * torch.randn(shape, dtype=recorded.dtype,
                                                device=recorded.device)
                if len(self._spare.get(name, ())) < shape[0]:
                    self._spare[name] = recorded.new_zeros(shape)
                return self._spare[name][:shape[0]]
            return forward

        def run(index: Tensor) -> Tensor:
            rows.append(index)
            try:
                return self.model(self.inputs[index])
            finally:
                rows.pop()

        prefix = self.prefix(layer)
        for name in prefix:
            self.model.get_submodule(name).forward = replayed(name)
        try:
            with torch.inference_mode():
                yield run
        finally:
            for name in prefix:
                del self.model.get_submodule(name).forward
