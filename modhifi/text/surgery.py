"""Apply a text plan (score → plan → apply): refit each consumer on its kept components, then
remove the components physically with Torch-Pruning's Linear pruners. Always on a copy.

A removed FFN neuron takes its up-projection row (and bias) and its down-projection column; a
removed head takes its query, key and value rows and its block of output-projection columns.
The per-layer widths go into the Hugging Face config (`intermediate_size` when every layer keeps
the same number of neurons, and `modhifi_shapes` always). A config has one head count for every
layer, so a saved folder holds the removed heads (and FFN neurons past `intermediate_size`) as
zeros after the kept ones (`full_width_state`): sentence-transformers reloads it by itself, with
the same embeddings, and `restore_shapes` cuts the zeros off again when modhifi loads it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from modhifi.errors import UserError, first_line
from modhifi.fidelity import LayerFidelity
from modhifi.hooks import private_copy
from modhifi.options import TextCompensation, check
from modhifi.text.components import TextAnalysis, TextPlan, block, consumer, producers
from modhifi.text.encoder import TransformerLayer, bert_of, read_config, transformer_layers

# config.json: {"ffn": [neurons per layer], "heads": [heads per layer]}
SHAPES_KEY = "modhifi_shapes"


@torch.no_grad()
def refit(analysis: TextAnalysis, layer: TransformerLayer, plan: TextPlan,
          keep: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumer's least-squares weight on the kept components and its bias shift.

    With a free bias the best fit uses the centred second moment (the covariance of the tokens'
    inputs, method.md §3.3), and the bias absorbs the mean of what was removed:
    b' = b + (W − W') μ.

    Returns:
        weight (c_out, c_in) zero on removed inputs, and the new bias (c_out,).
    """
    name = consumer(layer, plan.kind)
    linear = analysis.model.get_submodule(name)
    units = linear.in_features // block(layer, plan.kind)
    weight = linear.weight.view(linear.out_features, units, -1)  # (c_out, units, block)
    moments = analysis.moments[name]
    fidelity = LayerFidelity.from_moments(weight, moments, centered=True,
                                          lam=analysis.fidelity[name].lam)
    new = fidelity.refit_weight(torch.tensor(keep)).reshape(linear.weight.shape)
    mean = (moments.position_sum[0].double() / moments.samples).to(new.device)  # (c_in,)
    shift = ((linear.weight.double() - new.double()) @ mean).to(linear.bias)
    return new, linear.bias + shift


@torch.no_grad()
def apply_plan(analysis: TextAnalysis, plan: TextPlan, *,
               compensation: TextCompensation = "refit") -> nn.Module:
    """A new, physically smaller encoder: consumers compensated, components cut.

    Args:
        analysis: the analysis the plan came from (its model is only read).
        plan: which components each layer keeps.
        compensation: `refit` (least squares on the kept inputs, bias included), `rescale` (the
            paper's δ*) or `none`.
    """
    check(TextCompensation, compensation)
    if len(plan.kept) != len(analysis.layers):
        raise UserError(f"the plan has {len(plan.kept)} layers and the model "
                        f"{len(analysis.layers)}; make the plan from this analysis")
    pruned = private_copy(analysis.model)
    for layer, size, keep in zip(analysis.layers, plan.sizes, plan.kept):
        removed = sorted(set(range(size)) - set(keep))
        if not removed:
            continue
        name, width = consumer(layer, plan.kind), block(layer, plan.kind)
        linear = pruned.get_submodule(name)
        if compensation == "refit":
            weight, bias = refit(analysis, layer, plan, keep)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        elif compensation == "rescale":
            fidelity = analysis.fidelity[name]
            linear.weight.copy_(fidelity.rescaled_weight(torch.tensor(keep))
                                .reshape(linear.weight.shape))
        features = [unit * width + j for unit in removed for j in range(width)]
        tp.prune_linear_in_channels(linear, features)
        for producer in producers(layer, plan.kind):
            tp.prune_linear_out_channels(pruned.get_submodule(producer), features)
        if plan.kind == "heads":
            set_heads(pruned, layer, len(keep))
    record_shapes(pruned)
    return pruned


def set_heads(model: nn.Module, layer: TransformerLayer, heads: int) -> None:
    """Keep the attention module's head count in step with its (already cut) projections."""
    attention = model.get_submodule(layer.query.rsplit(".", 1)[0])
    attention.num_attention_heads = heads
    attention.all_head_size = heads * layer.head_size


def shapes(model: nn.Module) -> dict[str, list[int]]:
    """FFN neurons and heads of every layer."""
    layers = transformer_layers(model)
    return {"ffn": [model.get_submodule(l.ffn_down).in_features for l in layers],
            "heads": [model.get_submodule(l.attention_out).in_features // l.head_size
                      for l in layers]}


def record_shapes(model: nn.Module) -> None:
    """Write the per-layer widths into the model's config (saved with it)."""
    config = bert_of(model).config
    found = shapes(model)
    setattr(config, SHAPES_KEY, found)
    if len(set(found["ffn"])) == 1:
        config.intermediate_size = found["ffn"][0]


def full_width_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The encoder's weights with every layer as wide as its config's uniform sizes (what the
    model's own library builds), the components a layer lost as zeros after its kept ones; None
    where every layer has those widths. The same function: a zero FFN neuron outputs GELU(0) = 0,
    and a zero head attends evenly to zero values, its output columns zero too."""
    bert = bert_of(model)
    full = {"ffn": bert.config.intermediate_size, "heads": bert.config.num_attention_heads}
    state, prefix = dict(bert.state_dict()), "0.model."  # bert_of's name in the whole model
    widened = False
    for layer in transformer_layers(model):
        for kind in ("ffn", "heads"):
            missing = full[kind] * block(layer, kind) - model.get_submodule(
                consumer(layer, kind)).in_features
            if missing <= 0:
                continue
            widened = True
            name = consumer(layer, kind).removeprefix(prefix)
            state[f"{name}.weight"] = F.pad(state[f"{name}.weight"], (0, missing))  # columns
            for producer in producers(layer, kind):
                name = producer.removeprefix(prefix)
                state[f"{name}.weight"] = F.pad(state[f"{name}.weight"], (0, 0, 0, missing))
                state[f"{name}.bias"] = F.pad(state[f"{name}.bias"], (0, missing))  # rows
    return state if widened else None


def _leading(saved: dict[str, torch.Tensor],
             wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each saved tensor cut to the leading block of the shape the model has, where the rest is
    zeros (a folder saved at full width); any other tensor as saved (its shape then fails the
    strict load)."""
    fitted = dict(saved)
    for name, tensor in saved.items():
        shape = wanted[name].shape if name in wanted else None
        if shape is None or tensor.dim() != len(shape) or tensor.shape == shape or any(
                s < w for s, w in zip(tensor.shape, shape)):
            continue
        lead = tensor[tuple(slice(0, w) for w in shape)]
        if int(tensor.count_nonzero()) != int(lead.count_nonzero()):
            raise RuntimeError(f"{name} holds more than the recorded widths")
        fitted[name] = lead
    return fitted


def recorded_shapes(folder: Path) -> dict[str, list[int]] | None:
    """The widths a folder's config records (None for a model modhifi did not write)."""
    return read_config(folder).get(SHAPES_KEY)


def needs_restore(folder: Path) -> bool:
    """Whether the config's uniform sizes build other shapes than the saved weights have."""
    config = read_config(folder)
    wanted = config.get(SHAPES_KEY)
    if not wanted:
        return False
    return (set(wanted["ffn"]) != {config.get("intermediate_size")}
            or set(wanted["heads"]) != {config.get("num_attention_heads")})


@torch.no_grad()
def restore_shapes(model: nn.Module, folder: Path) -> None:
    """Give a just-loaded encoder the widths its config records, and load its saved weights
    (saved at full width, `full_width_state`, or at the recorded widths, as modhifi once did).

    Only needed when layers differ from what the config's uniform sizes build (heads removed,
    or FFN widths that differ per layer); otherwise a no-op.
    """
    wanted = recorded_shapes(folder)
    if not wanted or shapes(model) == wanted:
        return
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for layer, neurons, heads in zip(transformer_layers(model), wanted["ffn"], wanted["heads"]):
        for kind, count in (("ffn", neurons), ("heads", heads)):
            linear = model.get_submodule(consumer(layer, kind))
            width = block(layer, kind)
            extra = list(range(count * width, linear.in_features))
            if extra:
                tp.prune_linear_in_channels(linear, extra)
                for producer in producers(layer, kind):
                    tp.prune_linear_out_channels(model.get_submodule(producer), extra)
        set_heads(model, layer, heads)
    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has no model.safetensors; save the model with modhifi")
    bert = bert_of(model)
    try:
        bert.load_state_dict(_leading(load_file(str(weights)), bert.state_dict()), strict=True)
    except (SafetensorError, RuntimeError) as error:  # a damaged file, or other shapes
        raise UserError(f"the weights in {weights} do not fit the widths its config records "
                        f"({first_line(error)}); save the model again with modhifi") from None
    setattr(bert_of(model).config, SHAPES_KEY, wanted)
