"""Input statistics (method.md §1): the sums of a layer's input patches, from which every score,
fidelity and compensation follows.

`moments_of` reads one batch of a layer's inputs; `collect_moments` runs a model over batches
with hooks on several layers at once, optionally split into row subsets (the forget class and a
reference sample, say) and restricted to some output positions (those that reach the head).
Only Conv2d with groups=1 and Linear layers have such statistics (`is_scorable`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modhifi.batch import Batch, call, finite, size, to_device
from modhifi.distributed import Shard
from modhifi.errors import UserError
from modhifi.hooks import hooked

# Bound on the elements of one temporary (patch chunk, batch of Q_c) so memory stays ~100 MiB.
CHUNK_ELEMENTS = 2**24


@dataclass(frozen=True, eq=False)
class LayerMoments:
    """Sums over samples of a layer's input patches; shards of data merge with `+` (in one
    process) or `summed` (over several)."""

    second: Tensor  # (d, d) Σ over samples and positions of PᵀP, d = c_in·k²
    position_sum: Tensor  # (L, d) Σ over samples of the patch at each position
    samples: int  # N

    def __add__(self, other: LayerMoments) -> LayerMoments:
        if self.position_sum.shape != other.position_sum.shape:
            raise UserError(
                f"cannot merge moments with patch shapes {tuple(self.position_sum.shape)} and "
                f"{tuple(other.position_sum.shape)}; feed inputs of one size to a layer"
            )
        return LayerMoments(
            second=self.second + other.second,
            position_sum=self.position_sum + other.position_sum,
            samples=self.samples + other.samples,
        )

    def float64(self) -> LayerMoments:
        """The same sums in float64: batches add up in it, so that how they are grouped (one
        process or several) changes the sums by float64 rounding only."""
        return LayerMoments(self.second.double(), self.position_sum.double(), self.samples)

    def nothing(self) -> LayerMoments:
        """Sums over no sample, of these shapes (float64): what a process adds whose batches
        hold none of a subset's rows."""
        return LayerMoments(self.second.new_zeros(self.second.shape, dtype=torch.float64),
                            self.position_sum.new_zeros(self.position_sum.shape,
                                                        dtype=torch.float64), 0)

    def summed(self, shard: Shard) -> LayerMoments:
        """These sums added up over every process of `shard` (float64)."""
        if shard.world == 1:
            return self
        samples = shard.sum(torch.tensor([float(self.samples)], dtype=torch.float64,
                                         device=self.second.device))
        return LayerMoments(shard.sum(self.second.double().clone()),
                            shard.sum(self.position_sum.double().clone()), int(samples.item()))

    def mean_second(self) -> Tensor:
        """(d, d) E[Σ_positions PᵀP] in float64."""
        return self.second.double() / self.samples

    def centered_second(self) -> Tensor:
        """(d, d) E[Σ_positions PᵀP] − Σ_p μ_p μ_pᵀ with μ_p the mean patch at position p, in float64.

        Float64 because the subtraction cancels most of the magnitude when the means are large.
        """
        mu = self.position_sum.double() / self.samples  # (L, d)
        return self.mean_second().addmm_(mu.T, mu, alpha=-1)  # in place: no second (d, d)

    def pooled_centered_second(self) -> Tensor:
        """(d, d) E[Σ_positions (P − m)ᵀ(P − m)] with m the mean patch over samples and positions
        (float64): centred as a BatchNorm after the layer centres its outputs, one mean per
        channel whatever the position."""
        positions = len(self.position_sum)
        m = self.position_sum.double().sum(0) / (self.samples * positions)  # (d,)
        return self.mean_second().addr_(m, m, alpha=-positions)


def is_scorable(module: nn.Module) -> bool:
    """A layer whose input statistics we compute: Linear, or Conv2d with groups=1."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _check_supported(layer: nn.Module, inputs: Tensor) -> None:
    """Raise a one-line UserError unless `layer` can be scored on `inputs`."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise UserError(
                f"Conv2d with groups={layer.groups} is not supported; score only groups=1 convolutions"
            )
        if inputs.dim() != 4 or inputs.shape[1] != layer.in_channels:
            raise UserError(
                f"expected Conv2d input of shape (N, {layer.in_channels}, H, W), "
                f"got {tuple(inputs.shape)}; pass the batch this layer receives"
            )
    elif isinstance(layer, nn.Linear):
        if inputs.dim() < 2 or inputs.shape[-1] != layer.in_features:
            raise UserError(
                f"expected Linear input of shape (N, [T,] {layer.in_features}), "
                f"got {tuple(inputs.shape)}; pass the batch this layer receives"
            )
    else:
        raise UserError(f"{type(layer).__name__} is not supported; pass an nn.Conv2d or an nn.Linear")
    if len(inputs) == 0:
        raise UserError("the input batch is empty; pass at least one sample")
    if not torch.isfinite(inputs).all():
        raise UserError("the layer's inputs contain NaN or infinite values; check the data and "
                        "the weights that feed this layer")


def _patches(layer: nn.Conv2d | nn.Linear, inputs: Tensor) -> Tensor:
    """(N, L, d): the rows that `layer.weight.reshape(c_out, -1)` multiplies, channel-major."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(len(inputs), -1, layer.in_features)  # (N, [T,] c_in) -> (N, L, c_in)
    # Pad the way Conv2d itself does: F.unfold's symmetric zero padding cannot express
    # padding="same" with an even kernel or the reflect/replicate/circular modes.
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(inputs, layer._reversed_padding_repeated_twice, mode=mode)
    # Strided views give F.unfold's patches in F.unfold's order, ~30× faster on a CPU.
    (kh, kw), (dh, dw), (sh, sw) = layer.kernel_size, layer.dilation, layer.stride
    windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    # (N, c_in, H', W', kh, kw) -> (N, H'·W', c_in·kh·kw)
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(len(inputs), -1, layer.weight[0].numel())


def moments_of(layer: nn.Conv2d | nn.Linear, inputs: Tensor, *,
               positions: Tensor | None = None) -> LayerMoments:
    """Input statistics of one layer from one batch of its inputs.

    Args:
        layer: an `nn.Conv2d` with groups=1 or an `nn.Linear`.
        inputs: the layer's input, (N, c_in, H, W) for a conv, (N, [T,] c_in) for a linear layer.
        positions: (n,) indices of the output positions whose patches count (H'·W' of a conv
            output in row-major order, the flattened token axes of a linear one); None = all.

    Returns:
        The batch's `LayerMoments`, in the input's dtype (at least float32) on the input's device.

    Raises:
        UserError (a ValueError): for an unsupported layer or an input of the wrong shape.
    """
    inputs = _checked(layer, inputs)
    chunks = (_patches(layer, part) for part in inputs.split(_chunk(layer, inputs)))  # (n, L, d)
    if positions is not None:
        chunks = (patches[:, positions.to(patches.device)] for patches in chunks)
    return _sums(chunks, len(inputs))


def regression_moments(layer: nn.Conv2d | nn.Linear, inputs: Tensor,
                       targets: Tensor) -> LayerMoments:
    """Statistics of one layer's input patches with targets at the same output positions
    appended as more features: the sums a least squares of the targets on the patches needs
    (PᵀP, PᵀT and the means of both, in `second` and `position_sum`).

    Args:
        layer: an `nn.Conv2d` with groups=1 or an `nn.Linear`.
        inputs: the layer's input, as for `moments_of`.
        targets: (N, L, m): m values at each of the layer's L output positions (H'·W' in
            row-major order, or the flattened token axes).

    Returns:
        The `LayerMoments` of the rows [patch, target], of width d + m.
    """
    inputs = _checked(layer, inputs)
    chunk = _chunk(layer, inputs)
    chunks = (torch.cat([_patches(layer, part), aimed.to(part)], -1)  # (n, L, d + m)
              for part, aimed in zip(inputs.split(chunk), targets.detach().split(chunk)))
    return _sums(chunks, len(inputs))


def _checked(layer: nn.Conv2d | nn.Linear, inputs: Tensor) -> Tensor:
    """`inputs` checked for `layer` (`_check_supported`), detached, at least float32."""
    _check_supported(layer, inputs)
    return inputs.detach().to(torch.promote_types(inputs.dtype, torch.float32))


def _chunk(layer: nn.Conv2d | nn.Linear, inputs: Tensor) -> int:
    """Samples unfolded at a time: unfolding multiplies the data by k²."""
    return max(1, CHUNK_ELEMENTS // (inputs[0].numel() * layer.weight[0, 0].numel()))


def _sums(chunks: Iterable[Tensor], samples: int) -> LayerMoments:
    """The `LayerMoments` of rows that come a few samples at a time, (n, L, d) each."""
    second, position_sum = 0, 0
    for patches in chunks:
        rows = patches.reshape(-1, patches.shape[-1])  # (n·L, d)
        second = second + rows.T @ rows
        position_sum = position_sum + patches.sum(0)
    return LayerMoments(second, position_sum, samples)


def collect_moments(
    model: nn.Module,
    layers: Mapping[str, nn.Module] | Iterable[str],
    batches: Iterable[Batch],
    *,
    device: torch.device | str,
    positions: Mapping[str, Tensor | None] | None = None,
    private: bool = False,
) -> dict[str, LayerMoments]:
    """Input statistics of several layers from forward passes of `model` over every sample.

    The passes run on an eval-mode copy that shares the weights (`hooks.hooked`): the model is
    only read. With `private`, `model` is the calling function's own eval-mode copy, hooked in
    place.

    Args:
        model: the network to run, on `device`.
        layers: label -> layer of `model`, or module names.
        batches: model inputs (tensors, tuples or dicts of tensors: `modhifi.batch`); each is
            moved to `device`.
        device: where the forward passes and the statistics live.
        positions: module name -> the output positions that count (`moments_of`); None = all.

    Returns:
        label (or name) -> `LayerMoments` over all batches.

    Raises:
        UserError (a ValueError): for an unsupported layer, non-finite inputs, or a layer that no
            batch reached.
    """
    return collect_row_moments(model, layers, batches, device=device, positions=positions,
                               private=private)[None]


def collect_row_moments(
    model: nn.Module,
    layers: Mapping[str, nn.Module] | Iterable[str],
    batches: Iterable[Batch],
    *,
    device: torch.device | str,
    rows: Mapping[str, Tensor] | None = None,
    positions: Mapping[str, Tensor | None] | None = None,
    private: bool = False,
) -> dict[str | None, dict[str, LayerMoments]]:
    """`collect_moments` for several subsets of the samples at once, in one pass.

    Args:
        rows: subset label -> (N,) bool mask over all samples in the order the batches deliver
            them; a sample may be in several subsets. None: one subset, labelled None, of all.
        Other arguments as in `collect_moments`.

    Returns:
        subset label -> layer label -> `LayerMoments` of that subset's samples.
    """
    if isinstance(layers, Mapping):
        path = {module: name for name, module in model.named_modules()}
        named = {path[layer]: label for label, layer in layers.items()}  # name -> label
    else:
        named = {name: name for name in layers}
    positions = positions or {}
    subsets = dict(rows) if rows is not None else {None: None}
    moments: dict[str | None, dict[str, LayerMoments]] = {key: {} for key in subsets}
    current: dict[str | None, Tensor | None] = {}  # subset -> the running batch's rows in it

    def record(name: str, label: str):
        def hook(layer: nn.Module, args: tuple) -> None:
            x = args[0]  # (B, c_in, H, W) or (B, [T,] c_in)
            for key, mask in current.items():
                if mask is not None and not mask.any():
                    continue
                part = moments_of(layer, x if mask is None else x[mask],
                                  positions=positions.get(name)).float64()
                store = moments[key]
                store[label] = store[label] + part if label in store else part
        return hook

    start = 0
    hooks = {name: record(name, label) for name, label in named.items()}
    with torch.inference_mode(), hooked(model, before=hooks, private=private) as run:
        for batch in batches:
            batch = to_device(batch, device)
            if not finite(batch):
                raise UserError("the calibration inputs contain NaN or infinite values; "
                                "clean the data (every value must be a finite number)")
            n = size(batch)
            current = {key: None if mask is None else mask[start:start + n].to(device)
                       for key, mask in subsets.items()}
            call(run, batch)
            start += n
    for key, store in moments.items():
        missing = set(named.values()) - store.keys()
        if missing and (key is None or subsets[key].any()):
            raise UserError(f"no input reached layers {sorted(missing)}; pass layers the "
                            "forward pass uses")
    return moments
