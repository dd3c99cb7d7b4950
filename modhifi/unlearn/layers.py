"""Which layers ModHiFi-U edits (method.md §4.1), which edit suits them, and which of their
output positions reach the head.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from modhifi.errors import UserError
from modhifi.hooks import hooked, shared_copy
from modhifi.options import Edit
from modhifi.trace import classifier_name, forward_order

# The automatic choice tries editing the last 1..MAX_LAYERS prunable layers before the classifier
# and keeps the one that forgets the calibration images with the fewest changed predictions on
# the other classes: on fmnist-resnet it picks 2-4 (docs/benchmarks/unlearn_classes.md).
MAX_LAYERS = 4


def editable_layers(model: nn.Module, example: Tensor, *,
                    edit: Edit | None = None) -> tuple[str, ...]:
    """The prunable layers before the final classifier that an edit can act on, in forward order.

    Zeroing a slice removes its contribution whatever follows, so every layer qualifies.
    Negating one reverses what it adds to the residual stream only in a layer that writes the
    stream, i.e. the features the head reads. The test used is a proxy: output width = the
    classifier's input width, which in a ViT picks the patch embedding, attention output
    projections and second FFN layers (a ViT whose FFN hidden width equals its model width
    would also match its first FFN layers; a CNN's last-stage convs match too, though negate is
    not its default). Inside a block the sign of q/k/v or of an FFN hidden unit has no such
    meaning, and negating both FFN layers of a hidden unit cancels out.

    Args:
        model: the network, in eval mode.
        example: one input batch on the model's device.
        edit: `zero` or `negate`; None = `default_edit(model)`.

    Returns:
        Module names (all prunable layers before the classifier when none writes the stream).
    """
    order = forward_order(model, example)
    classifier = model.get_submodule(classifier_name(model, order))
    layers = [name for name in order if model.get_submodule(name) is not classifier]
    if (edit or default_edit(model)) == "negate":
        width = classifier.weight.shape[1]
        layers = [name for name in layers
                  if model.get_submodule(name).weight.shape[0] == width] or layers
    return tuple(layers)


def unlearnable_layers(model: nn.Module, example: Tensor, *, layers: int | None = None,
                       edit: Edit | None = None) -> tuple[str, ...]:
    """The last `layers` prunable layers before the final classifier, in forward order.

    Args:
        model: the network, in eval mode.
        example: one input batch on the model's device.
        layers: how many layers, at least 1; None = `MAX_LAYERS` (the candidates of the
            automatic choice), or all when fewer.
        edit: `zero` or `negate` (see `editable_layers`); None = `default_edit(model)`.

    Returns:
        Module names.
    """
    candidates = editable_layers(model, example, edit=edit)
    if layers is None:
        layers = min(MAX_LAYERS, len(candidates))
    most = len(candidates)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= most:
        raise UserError(f"layers={layers!r} is out of range: this model has {most} editable "
                        f"layers before its classifier; pass --layers 1..{most}")
    return tuple(candidates[-layers:])


def default_edit(model: nn.Module) -> Edit:
    """The pair edit by normalisation: `negate` when the model has a LayerNorm (Transformers),
    else `zero` (BatchNorm networks)."""
    return "negate" if any(isinstance(m, nn.LayerNorm) for m in model.modules()) else "zero"


def automatic_edit(model: nn.Module, example: Tensor) -> Edit:
    """What `unlearn` does when no edit is named: the class-direction gate (`direction`) when the
    pair edit would negate and the last layer before the head is a Linear (a Transformer's FFN
    down-projection: on `fmnist-vit` it forgets all 10 classes to ≤ 1% where negating pairs
    leaves 5 above, docs/results.md); otherwise `default_edit`."""
    edit = default_edit(model)
    last = unlearnable_layers(model, example, layers=1, edit=edit)[-1]
    return "direction" if edit == "negate" and isinstance(model.get_submodule(last),
                                                          nn.Linear) else edit


# --- which outputs reach the head ------------------------------------------------------------

# Layers with more output positions than this are taken to reach the head everywhere: the check
# runs the model once per position (batched), and such early, high-resolution layers are never
# the ones whose outputs a head discards.
REACH_MAX_POSITIONS = 1024
_REACH_CHUNK = 256  # perturbed copies per forward pass


def _output_positions(layer: nn.Module, shape: torch.Size) -> tuple[int, int]:
    """(positions, channels) of a layer output: H'·W' for a conv, the token axes for a Linear."""
    if isinstance(layer, nn.Conv2d):
        return math.prod(shape[2:]), shape[1]  # (B, c_out, H', W')
    return math.prod(shape[1:-1]), shape[-1]  # (B, [T,] c_out)


@torch.inference_mode()
def reaching_positions(model: nn.Module, name: str, example: Tensor, *,
                       seed: int = 0) -> Tensor | None:
    """The output positions of one layer that the logits depend on; None when all of them do.

    In a ViT only the class token leaves the last block (the head reads `x[:, 0]`): the block's
    per-token layers also process the patch tokens, whose outputs are discarded. The saliency
    must sum over the positions that reach the head only, or the patch tokens (49 of 50) decide
    the ranking. Found without gradients: copy p of one image gets large random noise at output
    position p of the layer, and p reaches the head when that copy's logits change.

    Args:
        model: the network, in eval mode; not modified.
        name: a Conv2d or Linear in `model`.
        example: one input batch (its first image is used) on the model's device.
        seed: for the noise.

    Returns:
        Sorted (n,) long indices into the positions (H'·W' of a conv output in row-major order,
        the flattened token axes of a Linear output), or None for all positions.
    """
    working = shared_copy(model)  # hooked and run only
    layer = working.get_submodule(name)
    shapes: list[torch.Size] = []
    with hooked(working, after={name: lambda m, args, out: shapes.append(out.shape)},
                private=True) as run:
        clean = run(example[:1])  # (1, K)
    positions, channels = _output_positions(layer, shapes[0])
    if positions == 1 or positions > REACH_MAX_POSITIONS:
        return None
    generator = torch.Generator().manual_seed(seed)
    reached = torch.zeros(positions, dtype=torch.bool)
    for index in torch.arange(positions).split(_REACH_CHUNK):
        copies = example[:1].expand(len(index), *example.shape[1:])
        noise = torch.zeros(len(index), positions, channels)  # (b, L, C): copy j at index[j]
        noise[torch.arange(len(index)), index] = torch.randn(len(index), channels,
                                                             generator=generator)

        def perturb(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            scale = 10 * out.abs().amax().clamp(min=1)  # larger than anything the layer writes
            n = noise.to(out) * scale
            return out + (n.transpose(1, 2) if isinstance(module, nn.Conv2d) else n).reshape(
                out.shape)

        with hooked(working, after={name: perturb}, private=True) as run:
            changed = (run(copies) - clean).abs().amax(1)  # (b,)
        # Far above the rounding differences between batch sizes (~1e-6 relative), far below
        # what noise ten times the layer's largest output does to the logits where it reaches.
        reached[index] = (changed > 1e-3 * clean.abs().amax().clamp(min=1e-6)).cpu()
    return None if reached.all() else reached.nonzero().squeeze(1)

