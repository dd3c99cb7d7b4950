"""Which channels must be removed together (method.md §3.1): Torch-Pruning's dependency graph,
filtered to the groups that only pass through operations acting on each channel alone, and the
per-layer sizes that cost a plan exactly before anything changes.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from modhifi.batch import clone, example_of
from modhifi.errors import UserError
from modhifi.hooks import shared_copy
from modhifi.metrics import count_cost
from modhifi.moments import is_scorable
from modhifi.trace import forward_order, last_linear

# The operations a prunable group may pass through: anything else (LayerNorm, attention heads,
# concatenation, unwrapped parameters) couples channels in ways we do not prune.
_PASS_THROUGH = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU,
                 nn.SiLU, nn.Hardswish, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.Flatten)
_PASS_THROUGH_OPS = ("_ElementWiseOp", "_ReshapeOp")
# Torch-Pruning calls every functional op it does not know "element-wise". Only these act on each
# channel alone (autograd names, without "Backward"); any other (the matmuls of attention, the
# transpose of a channel shuffle, a softmax or a mean over an unknown axis) mixes channels, so a
# group through it is left whole: never cut half-way, e.g. a value projection without its query.
_CHANNELWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Clone", "Relu", "Relu6", "Gelu", "Silu", "Sigmoid",
    "Tanh", "Elu", "LeakyRelu", "Hardswish", "Hardsigmoid", "Hardtanh", "Clamp", "Threshold",
    "MaxPool2DWithIndices", "AvgPool2D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D"})



@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, with the layers that make and read them."""

    name: str                          # the first producer's module name
    size: int
    producers: tuple[str, ...]         # layers whose output channels these are
    consumers: tuple[tuple[str, tuple[int, ...]], ...]  # (layer, its input index of each channel)
    norms: tuple[str, ...]             # BatchNorms over these channels


@dataclass(frozen=True)
class _Layer:
    """What the exact MACs/params bookkeeping needs to know about one Conv2d/Linear/BatchNorm."""

    macs: int
    weight: int          # parameters in the weight
    bias: int
    per_channel: bool    # depthwise conv or norm: the weight scales with the output channels only
    in_group: str | None
    out_group: str | None


@dataclass(frozen=True)
class Structure:
    """The coupled channel groups of a model and the per-layer sizes needed to cost a plan."""

    groups: tuple[ChannelGroup, ...]
    layers: dict[str, _Layer] = field(hash=False)
    macs: int
    params: int
    followed_by_norm: frozenset[str]   # layers whose output goes straight into a BatchNorm
    refused: tuple[str, ...] = ()      # what the first groups left whole pass through
    order: tuple[str, ...] = ()        # Conv2d/Linear layers in the order the forward calls them

    @property
    def consumers(self) -> tuple[str, ...]:
        """Every layer that reads a group's channels, in forward order."""
        names = dict.fromkeys(name for g in self.groups for name, _ in g.consumers)
        return tuple(sorted(names, key=lambda name: _position(self.order, name)))

    def group(self, name: str) -> ChannelGroup:
        return next(g for g in self.groups if g.name == name)

    def cost(self, kept: dict[str, int]) -> tuple[int, int]:
        """(MACs, params) of the model once each group keeps `kept[group]` channels."""
        sizes = {g.name: g.size for g in self.groups}

        def share(group: str | None) -> float:
            return kept.get(group, sizes[group]) / sizes[group] if group else 1.0

        macs, params = self.macs, self.params
        for layer in self.layers.values():
            out = share(layer.out_group)
            inp = 1.0 if layer.per_channel else share(layer.in_group)
            macs -= layer.macs - round(layer.macs * inp * out)
            params -= layer.weight - round(layer.weight * inp * out) + layer.bias - round(layer.bias * out)
        return macs, params


# What Torch-Pruning raises when it cannot work out the channels of an operation.
_TRACE_ERRORS = (ZeroDivisionError, IndexError, KeyError, ValueError, TypeError)
# Torch-Pruning's mapping of channel indices through each kind of operation: its
# `update_index_mapping`, one node at a time.
_MAPPINGS = {tp.ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
             tp.ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
             tp.ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
             tp.ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
             tp.ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
             tp.ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping}

# Torch-Pruning keeps one pruner per layer type for the whole process, and before asking a
# layer's width it sets on that pruner the dimension to measure (`pruning_dim`), so the graphs of
# concurrent sessions take turns there. Cutting a group sets it too, unlocked; but only the
# LayerNorm and Parameter pruners read it, and no group we cut contains either (_PASS_THROUGH).
_SHARED_PRUNERS = threading.RLock()


class _Graph(tp.DependencyGraph):
    """Torch-Pruning's dependency graph that survives an operation whose channels it cannot map.

    Torch-Pruning maps channel indices through every concatenation, split, reshape, ... from the
    shapes around it, and gives up on the whole model where it cannot (a channel shuffle's
    view → transpose → view, a concatenation whose input widths it cannot infer). Here such a
    node is recorded in `opaque` and made a plain pass-through without index mappings; no group
    through it is ever pruned (`_as_group`), and the rest of the model still is. Only this graph
    changes, never Torch-Pruning itself (the process is shared by every dashboard session).
    """

    opaque: dict[tp.Node, str]  # node -> why no group may pass through it
    _pruners: dict[nn.Module, object]  # module -> its Torch-Pruning pruner, until the next cut

    def build_dependency(self, model, example_inputs, **kwargs):
        self.opaque, self._pruners = {}, {}
        try:
            return super().build_dependency(model, example_inputs, **kwargs)
        except _TRACE_ERRORS:  # its last step maps the indices; redo it node by node
            if not getattr(self, "module2node", None) or not self._map_each_node():
                raise
            return self

    def get_pruner_of_module(self, module):
        # Asked at every node visited while Torch-Pruning infers a channel count, millions of
        # times on a Swin; the answer depends on the module's type and, for a convolution,
        # on whether it is depthwise, which a cut may change (so it is kept per group asked).
        if module not in self._pruners:
            self._pruners[module] = super().get_pruner_of_module(module)
        return self._pruners[module]

    def get_out_channels(self, module_or_node):
        with _SHARED_PRUNERS:
            return super().get_out_channels(module_or_node)

    def get_in_channels(self, module_or_node):
        with _SHARED_PRUNERS:
            return super().get_in_channels(module_or_node)

    def get_pruning_group(self, module, pruning_fn, idxs):
        self._pruners = {}
        for attempt in range(2):
            try:  # Torch-Pruning maps every node first: a cut changes the shapes it maps from
                return super().get_pruning_group(module, pruning_fn, idxs)
            except _TRACE_ERRORS as error:
                why = type(error).__name__
                mapped = [n for n in self.module2node.values() if n.type in _MAPPINGS]
                if not mapped:
                    raise
                if attempt == 0 and self._map_each_node():
                    continue  # a mapping fails on the new shapes: that node is opaque now
            break
        # A mapping failed on this group's indices: which one, it hides, so no channel passes
        # any mapped operation of this model.
        for node in mapped:
            self._make_opaque(node, f"its channels cannot be mapped ({why} in another mapped "
                                    "operation of this model)")
        return super().get_pruning_group(module, pruning_fn, idxs)

    def _map_each_node(self) -> bool:
        """Map every node's indices; a node whose mapping fails becomes opaque. True if one did."""
        failed = False
        for node in list(self.module2node.values()):
            update = _MAPPINGS.get(node.type)
            if update is None:
                continue
            try:
                update(self, node)
            except _TRACE_ERRORS as error:
                self._make_opaque(node, f"its channels cannot be mapped ({type(error).__name__})")
                failed = True
        return failed

    def _make_opaque(self, node: tp.Node, why: str) -> None:
        """Record `node` and make it a pass-through without index mappings."""
        self.opaque[node] = why
        node.type = tp.ops.OPTYPE.ELEMENTWISE  # Torch-Pruning maps only the other types
        for dep in (*node.dependencies, *(d for n in (*node.inputs, *node.outputs)
                                          for d in n.dependencies if d.target is node)):
            dep.index_mapping = [None, None]


@contextmanager
def dependency_graph(model: nn.Module, example: torch.Tensor) -> Iterator[_Graph]:
    """A block with Torch-Pruning's dependency graph of `model`, with the nodes no group may
    pass through in `graph.opaque`: the operations whose channels it cannot map and its reshapes
    that are not one-to-one.

    A group that passes through such a reshape (a feature map flattened into a Linear, a Swin
    window partition) is never pruned (`_as_group`). Torch-Pruning would still expand each channel
    into all its flattened positions while collecting the group, which runs out of memory on
    window attention (tens of GiB for swin_t at 64×64), so these reshapes are recorded, then made
    plain pass-throughs that Torch-Pruning maps one-to-one.

    When the block ends, the reference cycles of Torch-Pruning's nodes (each one's inputs list
    the others' outputs) are broken, so that the modules the graph refers to, and the weights a
    cut replaced, go with their last other reference, not at Python's next full collection: a
    large model is gigabytes.

    Raises:
        UserError: when Torch-Pruning cannot trace the model at all.
    """
    # Torch-Pruning traces the autograd graph: built with gradients on, whatever the caller's
    # mode (under no_grad or inference_mode there is none to trace), and with every weight in
    # it (a frozen one would leave its layers out of every group), frozen again after.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p in frozen:
                p.requires_grad_(True)
            graph = _Graph().build_dependency(model, example_inputs=clone(example),
                                              verbose=False)
    except _TRACE_ERRORS as error:
        raise UserError(f"Torch-Pruning cannot trace the channels of this model "
                        f"({type(error).__name__} in its {_failing_stage(error)}): it cannot be "
                        "pruned") from None
    finally:
        for p in frozen:
            p.requires_grad_(False)
    nodes = list(graph.module2node.values())
    flattening = frozenset(node for node in nodes if node.type == tp.ops.OPTYPE.RESHAPE and any(
        isinstance(m, _FlattenIndexMapping) for dep in node.dependencies for m in dep.index_mapping))
    for node in flattening:
        graph.opaque[node] = "a reshape that is not one-to-one"
        node.type = tp.ops.OPTYPE.ELEMENTWISE  # Torch-Pruning re-maps only RESHAPE nodes
    for node in nodes:
        for dep in node.dependencies:
            dep.index_mapping = [None if isinstance(m, _FlattenIndexMapping) else m
                                 for m in dep.index_mapping]
    try:
        yield graph
    finally:
        for node in nodes:
            node.inputs.clear()
            node.outputs.clear()
            node.dependencies.clear()


def _failing_stage(error: BaseException) -> str:
    """Torch-Pruning's function where `error` was raised, e.g. update_reshape_index_mapping."""
    frame = error.__traceback__
    while frame and frame.tb_next:
        frame = frame.tb_next
    return frame.tb_frame.f_code.co_name if frame else "graph"


def trace_structure(model: nn.Module, input_shape) -> Structure:
    """Find the prunable channel groups of `model` with Torch-Pruning's dependency graph.

    `input_shape`: the shape of one input, or a one-sample example of any form (`modhifi.batch`).
    """
    model = shared_copy(model, device="cpu")  # Torch-Pruning traces on the CPU
    names = {module: name for name, module in model.named_modules()}
    example = example_of(input_shape)
    order = forward_order(model, example)
    classifier = last_linear(model, order)
    head = [model.get_submodule(classifier)] if classifier else []  # its outputs are the classes
    groups, refused = [], {}  # refused: why groups were left whole, the first few
    with dependency_graph(model, example) as graph:
        for candidate in graph.get_all_groups(ignored_layers=head,
                                              root_module_types=(nn.Conv2d, nn.Linear)):
            blocker = _blocker(candidate, names, graph.opaque)
            if blocker is None:
                groups += [g for g in (_as_group(candidate, names, graph),) if g]
            elif len(refused) < 3:
                refused[blocker] = None
        followed = frozenset(names[node.module] for node in graph.module2node.values()
                             if isinstance(node.module, (nn.Conv2d, nn.Linear))
                             and any(isinstance(o.module, nn.modules.batchnorm._BatchNorm)
                                     for o in node.outputs))
    groups = in_forward_order(groups, order)
    cost = count_cost(model, input_shape)
    per_layer = dict(cost.per_layer)
    owner = {}
    for group in groups:
        owner.update({(n, "out"): group.name for n in group.producers + group.norms})
        owner.update({(n, "in"): group.name for n, _ in group.consumers})
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
            bias = module.bias.numel() if module.bias is not None else 0
            per_channel = (isinstance(module, nn.modules.batchnorm._BatchNorm)
                           or getattr(module, "groups", 1) > 1)
            layers[name] = _Layer(per_layer.get(name, 0), module.weight.numel(), bias, per_channel,
                                  owner.get((name, "in")), owner.get((name, "out")))
    return Structure(tuple(groups), layers, cost.macs, cost.params, followed, tuple(refused),
                     tuple(order))


def in_forward_order(groups: list[ChannelGroup], order: list[str]) -> list[ChannelGroup]:
    """Groups sorted by their first-called producer, each group's consumers by call order, so
    that every table and chart reads the network from input to output (Torch-Pruning's graph
    walk visits groups in no such order)."""
    return sorted((replace(g, consumers=tuple(sorted(g.consumers,
                                                     key=lambda c: _position(order, c[0]))))
                   for g in groups),
                  key=lambda g: min(_position(order, name) for name in g.producers))


def _position(order, name: str) -> int:
    """Where `name` is called in `order`; a layer the trace did not see goes last."""
    return order.index(name) if name in order else len(order)


def _multiplies_a_weight(grad_fn) -> bool:
    """A transpose of a parameter, or a matrix product with one (what nn.Linear runs); not a
    product of two activations (attention)."""
    inputs = [f for f, _ in getattr(grad_fn, "next_functions", ()) if f is not None]
    if grad_fn.name().startswith("TBackward"):
        return any(type(f).__name__ == "AccumulateGrad" for f in inputs)
    return any(f.name().startswith("TBackward") and _multiplies_a_weight(f) for f in inputs)


def _is_channelwise(node: tp.Node) -> bool:
    """Whether a functional op that Torch-Pruning traced acts on each channel alone."""
    grad_fn = node.grad_fn
    name = (grad_fn.name() if hasattr(grad_fn, "name") else "").split("Backward")[0]
    if name in ("T", "Addmm", "Mm"):  # inside a Linear: its weight transposed, then x @ Wᵀ (+ b)
        return _multiplies_a_weight(grad_fn)
    if name == "Mean":  # a global average pool, if it keeps the channel axis
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        dims = getattr(grad_fn, "_saved_dim", None)
        if sizes is None or dims is None:
            return False
        channel = 1 if len(sizes) == 4 else len(sizes) - 1  # NCHW, or (N, [T,] C)
        return all(d % len(sizes) != channel for d in dims)
    return name in _CHANNELWISE_OPS


def _blocker(group: tp.Group, names: dict, opaque: dict[tp.Node, str]) -> str | None:
    """What in `group` we do not prune through, named for a person; None when nothing is."""
    size = None
    for dep, idxs in group:
        node, module = dep.target, dep.target.module
        size = size or len(idxs)
        kind = type(module).__name__
        where = names.get(module) or f"a {_op_name(node)} operation"
        if node in opaque:
            return f"{where}: {opaque[node]}"
        if not isinstance(module, _PASS_THROUGH) and kind not in _PASS_THROUGH_OPS:
            return f"{where} ({kind})"
        if kind == "_ElementWiseOp" and not _is_channelwise(node):
            return f"{where}, which mixes channels"
        if isinstance(module, nn.Conv2d) and 1 < module.groups and not (
                module.groups == module.in_channels == module.out_channels):
            # grouped (not depthwise): a cut would leave counts `groups` cannot divide
            return f"{where} (Conv2d with groups={module.groups})"
        if len(idxs) != size:
            return f"{where}, which reads the channels unevenly"
    return None


def _op_name(node: tp.Node) -> str:
    """A traced functional operation's name, e.g. "transpose" or "cat"."""
    grad_fn = node.grad_fn
    return (grad_fn.name() if hasattr(grad_fn, "name") else "unknown").split("Backward")[0].lower()


def _as_group(group: tp.Group, names: dict, graph: tp.DependencyGraph) -> ChannelGroup | None:
    """A ChannelGroup of a group with no blocker: its producers, consumers and norms; None when
    no scorable layer reads it."""
    producers, consumers, norms, size = [], [], [], None
    for dep, idxs in group:
        module, handler = dep.target.module, dep.handler
        size = size or len(idxs)
        if graph.is_out_channel_pruning_fn(handler) and isinstance(module, (nn.Conv2d, nn.Linear)):
            producers.append(names[module])
        elif graph.is_in_channel_pruning_fn(handler) and isinstance(module, (nn.Conv2d, nn.Linear)):
            if is_scorable(module):
                consumers.append((names[module], tuple(int(i) for i in idxs)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            norms.append(names[module])
    if not producers or not consumers:
        return None
    return ChannelGroup(producers[0], size, tuple(producers), tuple(consumers), tuple(norms))
