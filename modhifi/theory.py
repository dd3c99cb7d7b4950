"""Theory the dashboard can show (method.md §6): local vs global error, Lipschitz bounds,
invariance by depth, and whether HiFi sets exist.

- **Local to global.** Masking input channels of a layer l (zeroing `W[:, i]`, every output
  sharing the mask m) changes its output by a local error `Σ_c (1−m)ᵀ Q_c (1−m)`, read from
  the input statistics without a forward pass (`masked_local_error`). `local_global` and
  `layer_errors` set it against the measured change of the logits `E‖f(x) − f_m(x)‖²` (no
  compensation, no BatchNorm recalibration) and against the bound `global ≤ C_l² · local`.
- **Lipschitz constants** (`lipschitz_table`, `bound_constants`): power iteration for
  convolutions (with their transpose, `F.conv_transpose2d`) and average pooling, the exact
  spectral norm for linear layers, `max |γ| / sqrt(var + eps)` for BatchNorm, the largest slope
  for activations, `sqrt(windows per input)` for max pooling. `C_l` composes them along the
  network after l: products along chains (`nn.Sequential`, `nets.ResNet`) and
  `Lip(branch) + Lip(shortcut)` for `nets.BasicBlock` (kind "composition", a bound up to the
  power-iteration estimates, which approach each norm from below). Other architectures get the
  product over the modules that run after l in forward order (kind "sequential"): a heuristic,
  not a bound, wherever the graph branches. A module with no known constant (LayerNorm,
  attention) makes the bound "unavailable".
- **Feature-extractor view** (Wiatowski & Bölcskei, 2015; `invariance`): each Conv2d/Linear
  layer's operator bound and the relative change of its output under circular translations and
  small smooth deformations of the input, by depth, for several models (dense and pruned).
- **HiFi existence** (`hifi_existence`): the smallest top-k set (by singleton fidelity) reaching
  fidelity 0.8 against a random-subset search, for the trained model and the same architecture
  untrained.
- `theory_report`: what `python -m modhifi theory` prints.

Input models are never modified: every pass with hooks, masks or replays runs on a deep copy.
Cost: one pass of the network after l per mask and calibration image (what runs before l is
replayed); on fmnist-resnet with 500 images, `layer_errors` (9 layers × 3 masks) takes ~7 s on one
CPU thread and keeps ~0.4 GB of replayed activations.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modhifi import nets
from modhifi.data import Dataset
from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity, hifi_size
from modhifi.hooks import hooked, private_copy
from modhifi.options import CALIBRATION_THEORY
from modhifi.prune import Analysis, ChannelGroup, analyse, modhifi_ranking, recalibrate_batchnorm
from modhifi.trace import Trace, trace_forward

BoundKind = Literal["composition", "sequential", "unavailable"]
Transform = Literal["translation", "deformation"]

# The largest slope of element-wise maps (GELU's is 1.1289 at x = √2, SiLU's 1.0998).
_SLOPE: dict[type, float] = {nn.ReLU: 1.0, nn.ReLU6: 1.0, nn.Tanh: 1.0, nn.Sigmoid: 0.25,
                             nn.GELU: 1.13, nn.SiLU: 1.1, nn.Hardswish: 1.5, nn.Identity: 1.0,
                             nn.Dropout: 1.0, nn.Flatten: 1.0}
_BRANCH = ("conv1", "bn1", "conv2", "bn2")  # nets.BasicBlock's residual branch (ReLU in between)


def _is_chain(module: nn.Module) -> bool:
    """True when the forward pass is the children applied in registration order."""
    return type(module).forward in (nn.Sequential.forward, nets.ResNet.forward)


def _is_basic_block(module: nn.Module) -> bool:
    return type(module).forward is nets.BasicBlock.forward


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


# --- Lipschitz constants ------------------------------------------------------------------------

_Map = Callable[[Tensor], Tensor]


def _power_iteration(apply: _Map, adjoint: _Map | None, shape: tuple[int, ...], *, like: Tensor,
                     iterations: int, tol: float, seed: int) -> float:
    """Largest singular value of the linear map `apply` on inputs of `shape` (batch dim excluded).

    `adjoint` is its transpose; None takes it from autograd (a vector-Jacobian product, exact
    for a linear map). The estimate sqrt(‖AᵀA v‖) with ‖v‖ = 1 never exceeds the true value and
    rises to it. Clustered top singular values (convolutions on large inputs) make it slow: on
    fmnist-resnet 100 steps leave it ~0.2% low, ~1000 reach float32 precision.
    """
    return _iterate(apply, adjoint, shape, like=like, iterations=iterations, tol=tol, seed=seed)


def _iterate(apply: _Map, adjoint: _Map | None, shape: tuple[int, ...], *, like: Tensor,
             iterations: int, tol: float, seed: int) -> float:
    v = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=like.dtype)
    v = v.to(like.device)
    if adjoint is None:
        with torch.inference_mode(False), torch.enable_grad():
            point = torch.zeros_like(v, requires_grad=True)
            image = apply(point)

        def adjoint(u: Tensor) -> Tensor:
            with torch.inference_mode(False):
                return torch.autograd.grad(image, point, u.clone(), retain_graph=True)[0]
    sigma = 0.0
    for _ in range(iterations):
        v = v / v.norm()
        v = adjoint(apply(v))  # AᵀA v
        new = float(v.norm()) ** 0.5
        if new == 0 or abs(new - sigma) <= tol * new:
            return new
        sigma = new
    return sigma


def conv_lipschitz(conv: nn.Conv2d, input_shape: tuple[int, int, int], *, iterations: int = 1000,
                   tol: float = 1e-8, seed: int = 0) -> float:
    """Spectral norm of a convolution (bias excluded) acting on inputs of `input_shape`.

    Power iteration alternates the convolution and its transpose: `F.conv_transpose2d` with the
    same stride and dilation, `output_padding` chosen so the shapes match, then cropping the zero
    padding. Other padding modes take the transpose from autograd. Results are memoised on the
    weight's content, so copies of a model share them.

    Args:
        conv: the layer; its weight is read, never changed.
        input_shape: (C, H, W) of one input.
        iterations, tol: stop after this many steps or when the relative change is below tol.

    Returns:
        The estimate, from below, of the largest singular value.
    """
    weight = conv.weight.detach()  # (c_out, c_in / groups, kh, kw)
    # Deep copies of one model (and repeated calls) share the result: key on the content.
    key = (hashlib.blake2b(weight.cpu().numpy().tobytes(), digest_size=16).hexdigest(),
           tuple(weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups,
           conv.padding_mode, tuple(input_shape), iterations, tol, seed)
    if key not in _CONV_NORMS:
        if len(_CONV_NORMS) > 1024:
            _CONV_NORMS.clear()
        _CONV_NORMS[key] = _conv_norm(conv, weight, tuple(input_shape), iterations=iterations,
                                      tol=tol, seed=seed)
    return _CONV_NORMS[key]


_CONV_NORMS: dict[tuple, float] = {}


def _conv_norm(conv: nn.Conv2d, weight: Tensor, input_shape: tuple[int, int, int], *,
               iterations: int, tol: float, seed: int) -> float:
    with torch.no_grad():
        if conv.padding_mode != "zeros":
            return _power_iteration(lambda v: conv._conv_forward(v, weight, None), None,
                                    input_shape, like=weight, iterations=iterations, tol=tol,
                                    seed=seed)
        left, right, top, bottom = conv._reversed_padding_repeated_twice
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        _, H, W = input_shape
        padded = (H + top + bottom, W + left + right)
        out = ((padded[0] - dh * (kh - 1) - 1) // sh + 1,
               (padded[1] - dw * (kw - 1) - 1) // sw + 1)
        # The rows and columns a strided convolution never reads come back as output_padding.
        extra = (padded[0] - (out[0] - 1) * sh - dh * (kh - 1) - 1,
                 padded[1] - (out[1] - 1) * sw - dw * (kw - 1) - 1)

        def apply(v: Tensor) -> Tensor:  # (1, C, H, W) -> (1, c_out, H', W')
            return F.conv2d(F.pad(v, (left, right, top, bottom)), weight, None, conv.stride, 0,
                            conv.dilation, conv.groups)

        def adjoint(u: Tensor) -> Tensor:  # (1, c_out, H', W') -> (1, C, H, W)
            full = F.conv_transpose2d(u, weight, None, conv.stride, 0, extra, conv.groups,
                                      conv.dilation)
            return full[..., top:top + H, left:left + W]

        return _power_iteration(apply, adjoint, input_shape, like=weight, iterations=iterations,
                                tol=tol, seed=seed)


def _max_pool_lipschitz(pool: nn.MaxPool2d) -> float:
    """|max a − max b| ≤ ‖a − b‖ per window, so Lip² ≤ the most windows one input falls in."""
    settings = (pool.kernel_size, pool.stride or pool.kernel_size, pool.dilation)
    pairs = [nn.modules.utils._pair(p) for p in settings]
    windows = 1
    for k, s, d in zip(*pairs):
        windows *= min(k, math.ceil((d * (k - 1) + 1) / s))
    return math.sqrt(windows)


def module_lipschitz(module: nn.Module, input_shape: tuple[int, ...] | None, *,
                     seed: int = 0) -> float | None:
    """Lipschitz constant (ℓ2) of one leaf module in eval mode, or None when none is known.

    Args:
        module: a Conv2d, Linear, BatchNorm (with running statistics), pooling or activation.
        input_shape: its input without the batch dim (needed for convolutions and average pools).
    """
    if isinstance(module, nn.Conv2d) and input_shape is not None:
        return conv_lipschitz(module, input_shape, seed=seed)
    if isinstance(module, nn.Linear):
        return float(torch.linalg.matrix_norm(module.weight.detach().double(), ord=2))
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
        gamma = module.weight.detach().abs() if module.affine else 1.0
        return float((gamma / (module.running_var + module.eps).sqrt()).max())
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) and input_shape is not None:
        with torch.no_grad():
            return _power_iteration(module, None, input_shape, like=torch.zeros(()),
                                    iterations=1000, tol=1e-8, seed=seed)
    if isinstance(module, nn.MaxPool2d):
        return _max_pool_lipschitz(module)
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    return _SLOPE.get(type(module))


class _Lipschitz:
    """Lipschitz constants of the modules of one model (a private eval-mode copy), cached."""

    def __init__(self, model: nn.Module, trace: Trace, *, seed: int = 0):
        self.model, self.trace, self.seed = model, trace, seed
        self._cache: dict[str, float | None] = {}

    def of(self, name: str) -> float | None:
        """The constant of the module `name` as a whole: chains multiply, BasicBlocks add."""
        if name not in self._cache:
            module = self.model.get_submodule(name)
            children = [_join(name, child) for child, _ in module.named_children()]
            if _is_chain(module):
                value = self._product(children)
            elif _is_basic_block(module):
                branch = self._product(_join(name, c) for c in _BRANCH)
                shortcut = self.of(_join(name, "shortcut"))
                value = None if branch is None or shortcut is None else branch + shortcut
            elif not children:
                value = module_lipschitz(module, self.trace.shapes.get(name), seed=self.seed)
            else:
                value = None
            self._cache[name] = value
        return self._cache[name]

    def _product(self, names: Iterable[str]) -> float | None:
        total = 1.0
        for name in names:
            value = self.of(name)
            if value is None:
                return None
            total *= value
        return total

    def after(self, layer: str) -> tuple[float | None, BoundKind]:
        """C_l: the constant of the map from `layer`'s output to the model's output."""
        value = self._after("", layer.split("."))
        if value is not None:
            return value, "composition"
        later = [n for n in self.trace.leaves if self.trace.start[n] > self.trace.start[layer]]
        value = self._product(later)
        return (value, "sequential") if value is not None else (None, "unavailable")

    def _after(self, name: str, path: list[str]) -> float | None:
        """From the output of the module at `path` (below `name`) to the output of `name`."""
        if not path:
            return 1.0
        module = self.model.get_submodule(name) if name else self.model
        child, rest = path[0], path[1:]
        inner = self._after(_join(name, child), rest)
        if inner is None:
            return None
        if _is_chain(module):
            names = [n for n, _ in module.named_children()]
            later = names[names.index(child) + 1:]
        elif _is_basic_block(module) and child in (*_BRANCH, "shortcut"):
            # The other summand of the residual addition does not change; the final ReLU is 1.
            later = list(_BRANCH[_BRANCH.index(child) + 1:]) if child in _BRANCH else []
        else:
            return None
        rest_of_module = self._product(_join(name, n) for n in later)
        return None if rest_of_module is None else inner * rest_of_module


def _private_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy, channels-last (~1.3x faster convolutions on a CPU, same results)."""
    return private_copy(model).to(memory_format=torch.channels_last)


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def lipschitz_table(model: nn.Module, *, input_shape: tuple[int, ...],
                    seed: int = 0) -> pd.DataFrame:
    """Per leaf module in forward order: depth, module, type, input_shape, lipschitz (NaN: none).

    Args:
        model: any network (eval mode is used; the model itself is not touched).
        input_shape: (C, H, W) of one input.
    """
    copy_ = _private_copy(model)
    trace = trace_forward(copy_, torch.zeros(1, *input_shape, device=_device_of(copy_)))
    lipschitz = _Lipschitz(copy_, trace, seed=seed)
    rows = [(depth, name, type(copy_.get_submodule(name)).__name__, trace.shapes.get(name),
             lipschitz.of(name)) for depth, name in enumerate(trace.leaves, 1)]
    frame = pd.DataFrame(rows, columns=["depth", "module", "type", "input_shape", "lipschitz"])
    frame["lipschitz"] = frame["lipschitz"].astype(float)
    return frame


def bound_constants(model: nn.Module, layers: Iterable[str], *, input_shape: tuple[int, ...],
                    seed: int = 0) -> pd.DataFrame:
    """C_l for each layer: columns layer, bound_constant (NaN when unavailable), bound_kind.

    "composition": the network after l composed along its structure (chains multiply,
    `nets.BasicBlock` adds branch and shortcut), a bound; "sequential": the product over the
    modules that run after l, a heuristic for other architectures; "unavailable": a module after l
    has no known constant.
    """
    copy_ = _private_copy(model)
    trace = trace_forward(copy_, torch.zeros(1, *input_shape, device=_device_of(copy_)))
    lipschitz = _Lipschitz(copy_, trace, seed=seed)
    rows = [(layer, *lipschitz.after(layer)) for layer in layers]
    frame = pd.DataFrame(rows, columns=["layer", "bound_constant", "bound_kind"])
    frame["bound_constant"] = frame["bound_constant"].astype(float)
    return frame


# --- local vs global error ----------------------------------------------------------------------

def masked_local_error(fidelity: LayerFidelity, masks: Tensor) -> Tensor:
    """Local error Σ_c (1−m)ᵀ Q_c (1−m) of each input mask, from the statistics alone.

    With one mask for every output, Σ_c uᵀQ_c u = uᵀ(Σ_c Q_c)u and
    Σ_c Q_c[i, j] = Σ_kl H[ik, jl] (WᵀW)[ik, jl]: one (d, d) product for any number of masks.

    Args:
        fidelity: the layer's fidelity; uncentred, so the error is E‖Y − Y_m‖² itself.
        masks: (n, c_in), 1 keeps an input channel, 0 zeroes W[:, i].

    Returns:
        (n,) float64 errors per sample.
    """
    c_out, c_in, K = fidelity.w.shape
    W = fidelity.w.reshape(c_out, -1)                                         # (c_out, d)
    Q_sum = (fidelity.H * (W.T @ W)).view(c_in, K, c_in, K).sum((1, 3))       # (c_in, c_in)
    U = 1 - masks.to(Q_sum)                                                   # (n, c_in)
    return torch.einsum("ni,ij,nj->n", U, Q_sum, U)


class _MaskedRuns:
    """The logits of a private copy of a model with one layer's input channels masked.

    Nothing that runs before the layer depends on the mask, so the outputs of the largest modules
    that finish before it are recorded on one clean pass and replayed (their forward is replaced
    on the copy); only the rest of the network runs again for each mask.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Tensor], layers: Iterable[str]):
        self.model, self.batches = _private_copy(model), tuple(map(_channels_last, batches))
        self.trace = trace_forward(self.model, self.batches[0][:1])
        self.replayed = {layer: self._finished_before(layer) for layer in layers}
        # name -> its output for each batch; ~0.4 GB for fmnist-resnet at 500 images.
        self.saved: dict[str, list[Tensor]] = {n: [] for n in set().union(*self.replayed.values())}
        keep = {n: lambda module, args, output, n=n: self.saved[n].append(output) for n in self.saved}
        with torch.inference_mode(), hooked(self.model, after=keep, private=True) as run:
            self.reference = [run(batch) for batch in self.batches]  # (B, classes) each

    def _finished_before(self, layer: str) -> set[str]:
        """The outermost modules that end before `layer` starts (not its ancestors)."""
        trace = self.trace
        if trace.calls.get(layer) != 1:
            raise UserError(f"layer {layer} runs {trace.calls.get(layer, 0)} times per forward "
                            "pass; choose a layer that runs exactly once")
        parts = layer.split(".")
        ancestors = {".".join(parts[:i]) for i in range(len(parts))}  # "" is the model itself
        return {n for n in trace.start if n not in ancestors and n.rpartition(".")[0] in ancestors
                and trace.calls[n] == 1 and trace.end[n] < trace.start[layer]}

    def global_errors(self, layer: str, masks: Tensor) -> Tensor:
        """(n,) E‖f(x) − f_m(x)‖² over the batches for each mask (n, c_in) on `layer`'s inputs."""
        current = {"batch": 0, "mask": None}

        def mask_inputs(module: nn.Module, args: tuple) -> tuple:
            mask = current["mask"]
            mask = mask[:, None, None] if isinstance(module, nn.Conv2d) else mask  # (c_in, 1, 1)
            return (args[0] * mask, *args[1:])

        for name in self.replayed[layer]:  # a clone, in case a later module works in place
            self.model.get_submodule(name).forward = (
                lambda *args, name=name, **kwargs: self.saved[name][current["batch"]].clone())
        errors = []
        try:
            with torch.inference_mode(), hooked(self.model, before={layer: mask_inputs},
                                                private=True) as run:
                for mask in masks:
                    current["mask"], total = mask.to(self.batches[0]), 0.0
                    for index, (batch, clean) in enumerate(zip(self.batches, self.reference)):
                        current["batch"] = index
                        total += float((run(batch) - clean).double().square().sum())
                    errors.append(total / sum(len(b) for b in self.batches))
        finally:
            for name in self.replayed[layer]:
                del self.model.get_submodule(name).forward
        return torch.tensor(errors, dtype=torch.float64)


def _check_layer(analysis: Analysis, layer: str) -> None:
    if layer not in analysis.fidelity:
        raise UserError(f"{layer!r} is not a scored consumer layer; use one of "
                        f"{', '.join(analysis.fidelity)}")


def _uncentred(analysis: Analysis, layer: str) -> LayerFidelity:
    """The layer's fidelity without centring: the bound is about E‖ΔY‖², means included."""
    weight = analysis.fidelity[layer].weight
    return LayerFidelity.from_moments(weight, analysis.moments[layer], centered=False)


def _random_masks(c_in: int, kept: float, n: int, generator: torch.Generator) -> Tensor:
    """(n, c_in) masks keeping max(1, round(kept·c_in)) channels chosen uniformly at random."""
    keep = max(1, round(kept * c_in))
    order = torch.rand(n, c_in, generator=generator).argsort(1)
    return torch.zeros(n, c_in).scatter_(1, order[:, :keep], 1.0)


def _hifi_masks(analysis: Analysis, layer: str, kept: Sequence[float]) -> Tensor:
    """(len(kept), c_in) the union rule within one layer: the best-priority channels kept."""
    c_in = analysis.fidelity[layer].w.shape[1]
    group = ChannelGroup(layer, c_in, (), ((layer, tuple(range(c_in))),), ())
    order = torch.tensor(modhifi_ranking(group, analysis.fidelity).order)
    masks = torch.zeros(len(kept), c_in)
    for row, share in enumerate(kept):
        masks[row, order[:max(1, round(share * c_in))]] = 1.0
    return masks


@dataclass(frozen=True, eq=False)
class LocalGlobal:
    """Local against global error of masking one layer's inputs, and the bound's constant."""

    layer: str
    # kind ("hifi" or "random"), kept_share, kept_channels, local_error, global_error, ratio,
    # bound (C_l² · local_error)
    table: pd.DataFrame = field(repr=False)
    fitted_ratio: float    # least squares through the origin: global ≈ fitted_ratio · local
    worst_ratio: float     # max global / local
    bound_constant: float  # C_l (NaN when unavailable); global ≤ C_l² · local
    bound_kind: BoundKind

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()


def local_global(analysis: Analysis, layer: str, *, kept: Sequence[float] = (0.25, 0.5, 0.75),
                 random_masks: int = 3, seed: int = 0) -> LocalGlobal:
    """Masks on `layer`'s inputs: local error from the statistics, global error measured.

    Args:
        analysis: `prune.analyse` of the model; its calibration batches give the global error.
        layer: a consumer layer of the analysis (a key of `analysis.fidelity`).
        kept: shares of input channels kept; each gets `random_masks` random masks and the HiFi
            mask (the union rule's best channels of this layer).
        random_masks: random masks per kept share.

    Returns:
        A `LocalGlobal` whose table has one row per mask.
    """
    _check_layer(analysis, layer)
    c_in = analysis.fidelity[layer].w.shape[1]
    generator = torch.Generator().manual_seed(seed)
    randoms = [_random_masks(c_in, share, random_masks, generator) for share in kept]
    masks = torch.cat([_hifi_masks(analysis, layer, kept), *randoms])  # (n, c_in)
    kinds = ["hifi"] * len(kept) + ["random"] * (len(kept) * random_masks)
    local = masked_local_error(_uncentred(analysis, layer), masks).cpu()
    runs = _MaskedRuns(analysis.model, analysis.calibration, [layer])
    measured = runs.global_errors(layer, masks)
    constant, kind = _Lipschitz(runs.model, runs.trace).after(layer)
    constant = math.nan if constant is None else constant
    table = pd.DataFrame({"kind": kinds, "kept_share": (masks.sum(1) / c_in).numpy(),
                          "kept_channels": [tuple(m.nonzero()[:, 0].tolist()) for m in masks],
                          "local_error": local.numpy(), "global_error": measured.numpy()})
    table["ratio"] = table.global_error / table.local_error
    table["bound"] = constant**2 * table.local_error
    fitted = float((local @ measured) / (local @ local))
    return LocalGlobal(layer, table, fitted, float(table.ratio.max()), constant, kind)


def layer_errors(analysis: Analysis, *, kept: float = 0.5, masks: int = 3,
                 seed: int = 0) -> pd.DataFrame:
    """Per consumer layer, the random mask (of `masks`, keeping `kept`) with the worst ratio.

    Returns:
        Columns layer, local_error, global_error, ratio (global / local, the worst of the masks),
        bound_constant (C_l, NaN when unavailable), bound_kind, bound (C_l² · local_error).
    """
    layers = list(analysis.fidelity)
    runs = _MaskedRuns(analysis.model, analysis.calibration, layers)
    lipschitz = _Lipschitz(runs.model, runs.trace)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for layer in layers:
        drawn = _random_masks(analysis.fidelity[layer].w.shape[1], kept, masks, generator)
        local = masked_local_error(_uncentred(analysis, layer), drawn).cpu()
        measured = runs.global_errors(layer, drawn)
        ratio = measured / local
        worst = int(ratio.nan_to_num(nan=-1.0).argmax())
        constant, kind = lipschitz.after(layer)
        rows.append((layer, float(local[worst]), float(measured[worst]), float(ratio[worst]),
                     math.nan if constant is None else constant, kind))
    frame = pd.DataFrame(rows, columns=["layer", "local_error", "global_error", "ratio",
                                        "bound_constant", "bound_kind"])
    frame["bound"] = frame.bound_constant**2 * frame.local_error
    return frame


# --- the feature-extractor view -----------------------------------------------------------------

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
        copy_ = _private_copy(model)
        device = _device_of(copy_)
        trace = trace_forward(copy_, images[:1].to(device))
        layers = [n for n in trace.leaves
                  if isinstance(copy_.get_submodule(n), (nn.Conv2d, nn.Linear))]
        lipschitz = _Lipschitz(copy_, trace, seed=seed)
        bounds = [1.0, *(lipschitz.of(n) for n in layers)]
        clean = _features(copy_, layers, _channels_last(images.to(device)))
        for transform, amount, moved in transforms:
            features = _features(copy_, layers, _channels_last(moved.to(device)))
            for depth, (name, a, b, bound) in enumerate(zip(["input", *layers], clean, features,
                                                            bounds)):
                change = (a - b).norm(dim=1) / a.norm(dim=1).clamp(min=1e-12)  # (N,)
                rows.append((label, name, depth, transform, float(amount), float(change.mean()),
                             bound))
    return pd.DataFrame(rows, columns=["model", "layer", "depth", "transform", "amount",
                                       "relative_change", "lipschitz_bound"])


# --- HiFi existence ------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _RandomOrder(LayerFidelity):
    """A layer whose inputs are ranked at random: its fidelity curves (hence `hifi_size`) follow
    random nested subsets instead of the singleton ranking (FS itself is unchanged)."""

    scores: Tensor  # (c_out, c_in) random priorities

    @cached_property
    def singleton(self) -> Tensor:
        return self.scores


def _random_search(fidelity: LayerFidelity, *, level: float, trials: int,
                   generator: torch.Generator) -> Tensor:
    """(c_out,) per output, the smallest share at which any of `trials` random orders reaches
    `level`; each order's prefixes are uniform random subsets of every size."""
    c_out, c_in = fidelity.weight.shape[:2]
    weight = fidelity.weight.repeat(trials, *[1] * (fidelity.weight.dim() - 1))  # (trials·c_out, …)
    scores = torch.rand(trials * c_out, c_in, generator=generator, dtype=torch.float64)
    shares = hifi_size(_RandomOrder(fidelity.H, weight, fidelity.lam, scores.to(fidelity.H)),
                       level=level)
    return shares.view(trials, c_out).min(0).values


def _existence_rows(label: str, fidelity: Mapping[str, LayerFidelity], *, level: float,
                    trials: int, outputs: int | None, seed: int) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for name, f in fidelity.items():
        c_out, c_in = f.weight.shape[:2]
        if outputs is not None and outputs < c_out:  # the same outputs for both searches
            rows_ = torch.randperm(c_out, generator=generator)[:outputs].sort().values
            f = LayerFidelity(f.H, f.weight[rows_.to(f.weight.device)], f.lam)
        topk = hifi_size(f, level=level)                                 # (outputs,)
        search = _random_search(f, level=level, trials=trials, generator=generator)
        rows.append((label, name, c_in, len(topk), float(topk.median()), float(search.median()),
                     float((topk <= search).double().mean())))
    return rows


@dataclass(frozen=True, eq=False)
class HifiExistence:
    """Smallest input shares reaching a fidelity level, top-k against a random search."""

    # model ("trained"/"untrained"), layer, inputs, outputs (sampled), topk_share, random_share
    # (medians over the outputs), topk_not_worse
    table: pd.DataFrame = field(repr=False)
    level: float
    threshold: float  # a layer "has HiFi sets" when its median top-k share is below this

    def share(self, model: str = "trained") -> float:
        """Share of `model`'s layers whose median top-k share is below `threshold`."""
        rows = self.table[self.table.model == model]
        return float((rows.topk_share < self.threshold).mean()) if len(rows) else math.nan

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()


def untrained_analysis(build: Callable[[], nn.Module], analysis: Analysis, *,
                       images: int = 256, seed: int = 0) -> Analysis:
    """The same architecture with fresh random weights, BatchNorm statistics recalibrated on
    the first `images` of `analysis`'s calibration data and analysed on them (the global RNG is
    left as it was). A few hundred images are plenty for the medians compared here (a conv
    layer sees thousands of patches per image) at a fraction of the full analysis's cost."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    device = analysis.calibration[0].device
    model = model.eval().to(device)
    batches = torch.cat(analysis.calibration)[:images].split(128)
    recalibrate_batchnorm(model, batches)
    return analyse(model, batches, device=device, input_shape=analysis.input_shape)


def hifi_existence(fidelity: Mapping[str, LayerFidelity], *,
                   untrained: Mapping[str, LayerFidelity] | None = None, level: float = 0.8,
                   threshold: float = 0.2, trials: int = 4, outputs: int | None = 32,
                   seed: int = 0) -> HifiExistence:
    """Per consumer layer: the median over output channels of the smallest input share reaching
    fidelity `level` with the top-k by singleton fidelity, and with the best of `trials` random
    subsets of each size (each random order's prefixes are one subset of every size).

    Args:
        fidelity: the trained model's layers, e.g. `analysis.fidelity`.
        untrained: the same for the architecture untrained (`untrained_analysis(...).fidelity`).
        outputs: output channels sampled per layer (the same for both searches); None: all.

    Returns:
        A `HifiExistence`; `topk_not_worse` is the share of outputs where top-k needs no more
        inputs than the random search.
    """
    rows = _existence_rows("trained", fidelity, level=level, trials=trials, outputs=outputs,
                           seed=seed)
    if untrained is not None:
        rows += _existence_rows("untrained", untrained, level=level, trials=trials,
                                outputs=outputs, seed=seed)
    table = pd.DataFrame(rows, columns=["model", "layer", "inputs", "outputs", "topk_share",
                                        "random_share", "topk_not_worse"])
    return HifiExistence(table, level, threshold)


# --- the CLI's report ----------------------------------------------------------------------------

def _plain(value: float) -> float | None:
    """JSON has no NaN: unknown numbers become null."""
    return None if value is None or math.isnan(value) else float(value)


def theory_report(model: nn.Module, dataset: Dataset, *, device: torch.device, name: str = "model",
                  calib_samples: int | None = None, kept: float = 0.5, masks: int = 3,
                  build: Callable[[], nn.Module] | None = None, seed: int = 0) -> dict:
    """What `python -m modhifi theory` prints: local/global errors per layer and HiFi existence.

    Args:
        model: the network (eval mode, on `device`); not modified.
        dataset: its dataset; the first `calib_samples` calibration images are used
            (default: 500, or all if fewer).
        name: the model's name in the report.
        kept, masks: each consumer layer gets `masks` random masks keeping `kept` of its inputs;
            the worst global/local ratio is reported.
        build: builds the architecture untrained; adds `hifi_share_untrained`.

    Returns:
        model, layers ([{layer, local_error, global_error, ratio, bound_constant, bound_kind}]),
        max_ratio, hifi_share (share of layers where < 20% of inputs reach fidelity ≥ 0.8, median
        over output channels), calib_samples, kept, masks, seconds (and hifi_share_untrained).
    """
    calib_samples = min(CALIBRATION_THEORY, len(dataset.calibration)) if calib_samples is None \
        else calib_samples
    if not 0 < calib_samples <= len(dataset.calibration):
        raise UserError(f"calibration samples {calib_samples} must be between 1 and "
                        f"{len(dataset.calibration)} for {dataset.name}")
    if not 0 < kept < 1:
        raise UserError(f"kept share {kept} must be in (0, 1): the share of inputs a mask keeps")
    start = time.perf_counter()
    batches = list(dataset.calibration.subset(slice(0, calib_samples)).batches(250, device=device))
    analysis = analyse(model, batches, device=device, input_shape=dataset.input_shape)
    errors = layer_errors(analysis, kept=kept, masks=masks, seed=seed)
    hifi = analysis.hifi_table(level=0.8)
    report = {
        "model": name,
        "layers": [{"layer": row.layer, "local_error": row.local_error,
                    "global_error": row.global_error, "ratio": _plain(row.ratio),
                    "bound_constant": _plain(row.bound_constant), "bound_kind": row.bound_kind}
                   for row in errors.itertuples()],
        "max_ratio": _plain(errors.ratio.max()),
        "hifi_share": float((hifi.hifi_share < 0.2).mean()),
        "calib_samples": calib_samples, "kept": kept, "masks": masks,
    }
    if build is not None:
        untrained = untrained_analysis(build, analysis, seed=seed).hifi_table(level=0.8)
        report["hifi_share_untrained"] = float((untrained.hifi_share < 0.2).mean())
    report["seconds"] = time.perf_counter() - start
    return report
