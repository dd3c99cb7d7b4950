"""The network as people read it: its Conv2d/Linear layers in forward order with readable names
and shapes, the channel groups that couple them, what a plan keeps of each group and how much of
each consumer's output the kept inputs still reproduce; and the one-group plans behind a
per-group sensitivity (accuracy when only that group is pruned).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pandas as pd

from modhifi.prune.apply import kept_inputs
from modhifi.prune.plan import PrunePlan
from modhifi.prune.tables import layer_shape

if TYPE_CHECKING:  # the analysis imports nothing from here
    from modhifi.prune.analysis import Analysis


def readable(name: str) -> str:
    """A module path in words: "layers.2.shortcut.0" -> "layers 2 · shortcut 0",
    "blocks.0.attn.qkv" -> "blocks 0 · attn · qkv", "conv1" -> "conv 1", "3" -> "module 3"."""
    parts: list[str] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append(f"{parts.pop() if parts else 'module'} {part}")
        else:
            parts.append(re.sub(r"(?<=[A-Za-z])(?=\d)", " ", part).replace("_", " "))
    return " · ".join(parts)


@dataclass(frozen=True)
class Architecture:
    """The layers (nodes) and the channels they pass to each other (edges), for a drawing.

    nodes: one row per Conv2d/Linear in forward order: layer (module path), name (`readable`),
        shape, macs (per input), writes / reads (the channel group of its outputs / inputs, ""
        when not prunable), kept (share of its output channels the plan keeps), fidelity (share
        of its output energy E‖Y‖² that its kept inputs, refitted, still reproduce, centred
        where a BatchNorm follows as in the analysis; NaN where the
        analysis has no statistics, e.g. the first layer, which reads the input).
    edges: one row per (producer, consumer called after it) of a group: source, target, group.
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame


def architecture(analysis: Analysis, plan: PrunePlan | None = None) -> Architecture:
    """The layers of `analysis.model` and what `plan` (none: the dense model) does to them."""
    structure, model = analysis.structure, analysis.model
    kept_share = {g.name: len(g.kept) / g.size for g in (plan.groups if plan else ())}
    kept = kept_inputs(structure, model, plan.removed_channels()) if plan else {}
    rows = []
    for name in structure.order:
        layer = structure.layers[name]
        fidelity = analysis.fidelity.get(name)
        if fidelity is None:
            kept_fidelity = math.nan
        elif name in kept:  # refit of the kept inputs, from the statistics alone
            lost = fidelity.reconstruction_error(fidelity.refit_weight(kept[name])).sum()
            kept_fidelity = float(1 - lost / fidelity.energy.sum().clamp(min=1e-30))
        else:
            kept_fidelity = 1.0
        rows.append({"layer": name, "name": readable(name),
                     "shape": layer_shape(model.get_submodule(name)), "macs": layer.macs,
                     "writes": layer.out_group or "", "reads": layer.in_group or "",
                     "kept": kept_share.get(layer.out_group, 1.0), "fidelity": kept_fidelity})
    # A residual stream's group also lists the consumers called before a producer that adds
    # into it (a block's first conv reads the stream its own last conv later adds to): no flow.
    position = {name: i for i, name in enumerate(structure.order)}
    edges = [(producer, consumer, g.name) for g in structure.groups
             for producer in g.producers for consumer, _ in g.consumers
             if position.get(producer, -1) < position.get(consumer, -1)]
    return Architecture(pd.DataFrame(rows),
                        pd.DataFrame(edges, columns=["source", "target", "group"]))


def only_group(analysis: Analysis, plan: PrunePlan, group: str) -> PrunePlan:
    """The plan that removes `group`'s channels as `plan` does and keeps every other group
    whole, with its own exact MACs and parameters."""
    (chosen,) = (g for g in plan.groups if g.name == group)
    macs, params = analysis.structure.cost({group: len(chosen.kept)})
    return replace(plan, method=f"{plan.method}, only {group}", groups=(chosen,),
                   macs_after=macs, params_after=params)
