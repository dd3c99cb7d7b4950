"""Record the part of a network before a layer once, then replay it.

Changing a layer (masking its inputs, editing its weights) leaves everything that finishes before
the layer starts unchanged, so many variants of the same inputs need only the rest of the network
run again. `Replay` keeps a private copy of the model, records the outputs of the outermost
modules that finish before each chosen layer (`prefix_modules`) on one clean pass over fixed
inputs, and inside `Replay.before(layer)` those modules return their recorded rows instead of
running. Used by ModHiFi-U's search of k (`modhifi.unlearn.search`) and by the theory's global
errors (`modhifi.theory.local_global`). `Frontier` does the same for a model that is settled layer
by layer in forward order (the sequential refit): each pass records the prefix the next replays.

The replayed modules are swapped out only by an instance attribute `forward` on the private copy,
set and removed by `before` (by `Frontier.passes`, on the caller's copy); the model given is never
touched, and attribute reads of the replayed modules (a parent reading a child's weight, say)
still work.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from modhifi.batch import Batch, size
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


def inside(name: str, modules: Iterable[str]) -> bool:
    """Module `name` is one of `modules` or inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


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

        samples = [0]  # the running batch's
        mixed: set[str] = set()  # outputs whose rows are not the samples: they run, not replay

        def keep(name: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                if not output.dim() or len(output) != samples[0]:
                    mixed.add(name)
                if name in recorded:  # (not once over the budget)
                    # a copy: the parent's code may write into the output (`out += identity`)
                    recorded[name].append(output.clone())
            return hook

        logits = []
        with hooked(self.model, after={name: keep(name) for name in names}, private=True) as run:
            for start in range(0, len(self.inputs), batch_size):
                samples[0] = len(self.inputs[start:start + batch_size])
                logits.append(run(self.inputs[start:start + batch_size]))
                per_input = sum(r[0][0].numel() * r[0].element_size() for r in recorded.values())
                if start == 0 and per_input * len(self.inputs) > max_bytes:
                    recorded.clear()
                    self._prefix = {layer: () for layer in self._prefix}
        self._prefix = {layer: tuple(n for n in prefix if n not in mixed)
                        for layer, prefix in self._prefix.items()}
        self._outputs = {name: torch.cat(parts) for name, parts in recorded.items()
                         if name not in mixed}
        return torch.cat(logits)  # (N, K)

    def prefix(self, layer: str) -> tuple[str, ...]:
        """The modules `before(layer)` replays."""
        return self._prefix[layer]

    def recorded(self, name: str) -> Tensor:
        """(N, ...) the recorded outputs of prefix module `name` (one row where none is read)."""
        return self._outputs[name]

    def read(self, layer: str) -> frozenset[str]:
        """The modules of `prefix(layer)` whose recorded outputs the rest of the network reads."""
        return self._read[layer]

    def unread(self, layer: str) -> frozenset[str]:
        """The modules of `prefix(layer)` whose outputs nothing after them reads."""
        return frozenset(self.prefix(layer)) - self._read[layer]

    @torch.inference_mode()
    def _read_later(self, layer: str) -> frozenset[str]:
        """The prefix modules of `layer` whose recorded outputs the rest of the network reads.

        A module is unread when large random outputs in its place (alone, then all unread ones
        together) leave the logits and the inputs of every leaf module that runs after the
        prefix exactly as they were (not the logits alone: a zero classifier hides what it is
        given): e.g. every block of a ViT but the last before `layer`, whose outputs only the
        replayed next block would read. Each test is a row of one batch, every row the first
        input.
        """
        prefix = self.prefix(layer)
        if not prefix:
            return frozenset()
        # row 0 clean, row 1 + i with random outputs of prefix[i]
        noisy = {name: torch.arange(len(prefix) + 1) == i + 1 for i, name in enumerate(prefix)}
        same = self._unchanged(layer, noisy)
        unread = [name for i, name in enumerate(prefix) if same[i]]
        together = {name: torch.arange(2) == 1 for name in unread}
        if len(unread) > 1 and not self._unchanged(layer, together)[0]:
            unread = []  # they matter together
        return frozenset(prefix) - set(unread)

    def _unchanged(self, layer: str, noisy: dict[str, Tensor]) -> list[bool]:
        """Run copies of the first input, one per row of the masks in `noisy`, with the prefix of
        `layer` replayed and each module's outputs random in the rows it marks: for each row but
        the first, whether everything computed after the prefix is as in the first."""
        prefix = self.prefix(layer)
        rows = len(next(iter(noisy.values())))
        changed = torch.zeros(rows, dtype=torch.bool, device=self.inputs.device)
        unsure = [False]  # a tensor whose rows are not the samples: no row can be told apart

        def compare(*tensors) -> None:  # as they come: a later in-place operation changes them
            for t in tensors:
                if not isinstance(t, Tensor) or not t.dim():
                    continue
                if len(t) == rows:
                    changed.logical_or_((t != t[:1]).reshape(rows, -1).any(1))
                else:  # tokens flattened into the batch axis, a sequence-first tensor
                    unsure[0] = True

        # what reaches a module reaches a leaf, or the logits
        leaves = [name for name, m in self.model.named_modules()
                  if name and next(m.children(), None) is None and not inside(name, prefix)]
        inputs = {name: lambda module, args: compare(*args) for name in leaves}
        index = torch.zeros(rows, dtype=torch.long, device=self.inputs.device)
        with self._installed(layer, frozenset(prefix), noisy=noisy) as run, \
                hooked(self.model, before=inputs, private=True):
            logits = run(index)
        compare(logits)
        if unsure[0] or not isinstance(logits, Tensor):
            return [False] * (rows - 1)  # every module read: recordings cost memory, not numbers
        return [not bool(c) for c in changed[1:]]

    @contextmanager
    def before(self, layer: str) -> Iterator[Callable[[Tensor], Tensor]]:
        """A block in which `run(index)` returns the logits of `inputs[index]` with the prefix of
        `layer` replayed (an unrecorded prefix runs whole forward passes)."""
        with self._installed(layer, self._read[layer]) as run:
            yield run

    @contextmanager
    def _installed(self, layer: str, copied: frozenset[str], *,
                   noisy: dict[str, Tensor] | None = None
                   ) -> Iterator[Callable[[Tensor], Tensor]]:
        """Replay the prefix of `layer`: modules in `copied` return their recorded rows (random
        values in the rows a `noisy` mask marks for them), the others a tensor of the right
        shape whose values nothing reads."""
        rows: list[Tensor] = []  # the running call's input indices

        def replayed(name: str) -> Callable[..., Tensor]:
            recorded = self._outputs[name]  # (N, ...)

            def forward(*args, **kwargs) -> Tensor:
                if name in copied:
                    out = recorded[rows[-1]]  # a copy: in-place ops downstream are harmless
                    if noisy and name in noisy:
                        mask = noisy[name].to(out.device)
                        noise = torch.Generator(out.device).manual_seed(0)  # not torch's own
                        out[mask] = _NOISE * torch.randn(out[mask].shape, generator=noise,
                                                         dtype=out.dtype, device=out.device)
                    return out
                shape = (len(rows[-1]), *recorded.shape[1:])
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


def _producer(made: Mapping[int, tuple[str, weakref.ref]], output: Tensor) -> str | None:
    """The module of `made` (data pointer -> module, its output) whose output `output` is: held
    still (so that its memory is not another's since), of the same shape; else None."""
    name, ref = made.get(output.data_ptr(), (None, lambda: None))
    earlier = ref()
    return name if earlier is not None and earlier.shape == output.shape else None


def _in_place(args: tuple, output) -> bool:
    """The module wrote its output into its first input (an in-place ReLU)."""
    return (bool(args) and isinstance(args[0], Tensor) and isinstance(output, Tensor)
            and output.data_ptr() == args[0].data_ptr() and output.shape == args[0].shape)


class Frontier:
    """Passes over fixed inputs of a model settled layer by layer in forward order, each pass
    replaying what the previous one reached.

    The sequential refit (`prune.apply.refit_in_order`) runs the network up to each consumer in
    turn, then refits it. What finished before the previous pass's layer started no longer
    changes, so `passes(layer)` replays those modules' outputs, recorded by the previous pass,
    instead of running them again, and records the modules that finish before `layer` for the
    next: the passes up to every layer cost about one forward pass in all, not one per layer.

    Args:
        model: the caller's private copy; `passes` sets and removes instance `forward`s on it.
        chunks: the inputs of each forward pass, the same on every call of `passes`.
        trace: `trace_forward` of the model (or of one with the same modules).
        unread: layer -> modules of `prefix_modules(trace, layer)` whose outputs nothing after
            them reads (`Replay.unread`): they return zeros (an in-place module too, unless the
            output it wrote over is read). The others are recorded.
        max_bytes: the most recorded outputs kept; past it, a pass records nothing and the next
            runs from the input.
        agree: whether every process that shares the work settled (`Shard.all`), so that all
            of them replay the same modules.
    """

    def __init__(self, model: nn.Module, chunks: list[Batch], trace: Trace,
                 unread: Mapping[str, frozenset[str]], *, max_bytes: int = 2**31,
                 agree: Callable[[bool], bool] = bool):
        self.model, self.chunks, self.trace, self.unread = model, chunks, trace, unread
        self.max_bytes, self.agree = max_bytes, agree
        self._samples = sum(size(chunk) for chunk in chunks)
        self.settled: tuple[str, ...] = ()  # the modules the next pass replays
        self.largest = 0  # the most bytes the recordings of a settled pass came to
        # name -> per chunk: its output, or a meta tensor of its shape where nothing reads it
        self._outputs: dict[str, list[Tensor]] = {}
        # modules that return their input, written over (an in-place ReLU) -> the module whose
        # output they wrote over, or None where another's (the parent's code, the input)
        self._wrote_over: dict[str, str | None] = {}

    def passes(self, layer: str) -> Iterator[Batch]:
        """Yield each chunk for the caller to run through `model`, each pass ending where `layer`
        starts or later; while it runs, the settled modules return their recorded outputs. After
        the last chunk, the modules that finished before `layer` are the settled ones."""
        prefix = prefix_modules(self.trace, layer)
        unread = self.unread.get(layer, frozenset())

        def kept(name: str) -> bool:
            if name not in unread:
                return True
            if name not in self._wrote_over:
                return False
            # an in-place module's output is also the buffer it wrote over: kept where that
            # output is (whose recording is from before the writing), along a chain of them
            over = self._wrote_over[name]
            return over is None or kept(over)

        # a settled module keeps its recording while the rest of the network reads it; what it
        # reads only shrinks, so once unread, a module returns zeros of its shape from then on.
        # Where a dropped one is read again (the read test's joint run can find every module
        # read), nothing is replayed: the pass runs from the input and records afresh.
        if any(kept(name) and self._outputs[name][0].is_meta for name in self.settled
               if name in prefix):
            self.settled, self._outputs = (), {}
        recorded = {name: [o if kept(name) else o.to("meta") for o in self._outputs.get(name, [])]
                    for name in prefix}
        index, over = [0], [False]  # the running chunk; over the budget
        made: dict[int, tuple[str, weakref.ref]] = {}  # the running chunk's prefix outputs

        def record(name: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                if name not in self.settled:
                    if _in_place(args, output) and name not in self._wrote_over:
                        self._wrote_over[name] = _producer(made, output)
                    if not over[0]:  # a copy: a later in-place operation must not change it
                        recorded[name].append(output.clone() if kept(name) else output.to("meta"))
                if isinstance(output, Tensor):
                    made[output.data_ptr()] = name, weakref.ref(output)
            return hook

        def replayed(name: str) -> Callable[..., Tensor]:
            outputs = self._outputs[name]

            def forward(*args, **kwargs) -> Tensor:
                kept = outputs[index[0]]
                if kept.is_meta:  # unread: the right shape will do
                    return torch.zeros(kept.shape, dtype=kept.dtype, device=self._device)
                if name in self._wrote_over:  # write into the input, as the module did
                    return args[0].copy_(kept)
                return kept.clone()  # a copy: in-place operations downstream are harmless
            return forward

        saved = {name: self.model.get_submodule(name).__dict__.get("forward")
                 for name in self.settled}  # an instance `forward` of its own, put back after
        for name in self.settled:
            self.model.get_submodule(name).forward = replayed(name)
        try:
            with hooked(self.model, after={name: record(name) for name in prefix}, private=True):
                for index[0], chunk in enumerate(self.chunks):
                    yield chunk
                    made.clear()
                    if index[0] == 0:  # the first chunk's recordings, per input, for all
                        over[0] = self._bytes(recorded) > self.max_bytes
        finally:
            for name, own in saved.items():
                del self.model.get_submodule(name).forward
                if own is not None:
                    self.model.get_submodule(name).forward = own
        complete = self.agree(not over[0] and all(len(v) == len(self.chunks)
                                                  for v in recorded.values()))
        self.settled = tuple(recorded) if complete else ()
        self._outputs = recorded if complete else {}
        if complete:
            self.largest = max(self.largest, self._bytes(recorded))

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _bytes(self, recorded: Mapping[str, list[Tensor]]) -> int:
        """The recordings' size once every chunk is in, from the first chunk's per input."""
        first = sum(outputs[0].nbytes for outputs in recorded.values()
                    if outputs and not outputs[0].is_meta)
        return first * self._samples // size(self.chunks[0])
