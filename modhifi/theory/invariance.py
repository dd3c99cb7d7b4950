"""The feature-extractor view (Wiatowski & Bölcskei, 2015; method.md §6): each Conv2d/Linear
layer's operator bound and the relative change of its output under circular translations and
small smooth deformations of the input, by depth, for several models (dense and pruned).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modhifi.hooks import hooked, private_copy
from modhifi.metrics import channels_last
from modhifi.theory.lipschitz import Lipschitz, device_of
from modhifi.trace import trace_forward

Transform = Literal["translation", "deformation"]


def translate(images: Tensor, pixels: int) -> Tensor:
    """Circular shift by `pixels` along both image axes (down and right): (N, C, H, W) -> same."""
    return torch.roll(images, shifts=(pixels, pixels), dims=(2, 3))


def deform(images: Tensor, amount: float, *, generator: torch.Generator) -> Tensor:
    """Warp each image by a smooth random displacement field whose largest displacement is
    `amount` pixels (bicubic upsampling of a 4×4 random field; bilinear sampling, border fill).
    """
    n, _, h, w = images.shape
    coarse = torch.randn(n, 2, 4, 4, generator=generator, dtype=images.dtype).to(images.device)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)  # (n, 2, h, w)
    largest = field.norm(dim=1).flatten(1).amax(1).clamp(min=1e-12)                # (n,)
    field = field * (amount / largest)[:, None, None, None]                          # pixels
    identity = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(n, 2, 3)
    grid = F.affine_grid(identity, [n, 1, h, w], align_corners=False)                # (n, h, w, 2)
    shift = torch.stack([field[:, 0] * 2 / w, field[:, 1] * 2 / h], dim=-1)          # (n, h, w, 2)
    return F.grid_sample(images, grid + shift, mode="bilinear", padding_mode="border",
                         align_corners=False)


def _features(model: nn.Module, layers: Sequence[str], images: Tensor) -> list[Tensor]:
    """(N, features) outputs of `layers`, the input itself first; `model` is a private copy."""
    outputs: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            outputs.setdefault(name, output.flatten(1))  # (N, features) of the first call
        return hook

    with torch.inference_mode(), hooked(model, after={n: keep(n) for n in layers},
                                        private=True) as run:
        run(images)
    return [images.flatten(1), *(outputs[n] for n in layers)]


def invariance(models: Mapping[str, nn.Module], images: Tensor, *,
               shifts: Sequence[int] = (0, 1, 2, 3, 4),
               deformations: Sequence[float] = (0.5, 1.0, 2.0), seed: int = 0) -> pd.DataFrame:
    """Relative change ‖Φ(x) − Φ(Tx)‖ / ‖Φ(x)‖ of each layer's features, by depth.

    Φ at depth d is the output of the d-th Conv2d/Linear in forward order (depth 0: the input),
    i.e. before BatchNorm and the non-linearity (Wiatowski & Bölcskei's features come after them).
    Translations are circular; deformations are smooth random fields (the same fields for every
    model). `lipschitz_bound` is the layer operator's spectral norm at its input size.

    Args:
        models: label -> model, e.g. {"dense": model, "pruned": pruned}; none is modified.
        images: (N, C, H, W) normalised inputs.
        shifts: translations in pixels; deformations: largest displacements in pixels.

    Returns:
        Tidy table: model, layer, depth, transform, amount, relative_change, lipschitz_bound.
    """
    transforms: list[tuple[Transform, float, Tensor]] = [
        ("translation", s, translate(images, s)) for s in shifts]
    generator = torch.Generator().manual_seed(seed)
    transforms += [("deformation", a, deform(images, a, generator=generator)) for a in deformations]
    rows = []
    for label, model in models.items():
        copy_ = private_copy(model, channels_last=True)
        device = device_of(copy_)
        trace = trace_forward(copy_, images[:1].to(device))
        layers = [n for n in trace.leaves
                  if isinstance(copy_.get_submodule(n), (nn.Conv2d, nn.Linear))]
        lipschitz = Lipschitz(copy_, trace, seed=seed)
        bounds = [1.0, *(lipschitz.of(n) for n in layers)]
        clean = _features(copy_, layers, channels_last(images.to(device)))
        for transform, amount, moved in transforms:
            features = _features(copy_, layers, channels_last(moved.to(device)))
            for depth, (name, a, b, bound) in enumerate(zip(["input", *layers], clean, features,
                                                            bounds)):
                change = (a - b).norm(dim=1) / a.norm(dim=1).clamp(min=1e-12)  # (N,)
                rows.append((label, name, depth, transform, float(amount), float(change.mean()),
                             bound))
    return pd.DataFrame(rows, columns=["model", "layer", "depth", "transform", "amount",
                                       "relative_change", "lipschitz_bound"])
