"""Local against global error (method.md §6): masking input channels of a layer l (zeroing
`W[:, i]`, every output sharing the mask m) changes its output by a local error
`Σ_c (1−m)ᵀ Q_c (1−m)`, read from the input statistics without a forward pass
(`masked_local_error`); `local_global` and `layer_errors` set it against the measured change of
the logits `E‖f(x) − f_m(x)‖²` (no compensation, no BatchNorm recalibration) and against the
bound `global ≤ C_l² · local`.

Cost: one pass of the network after l per mask and calibration image (what runs before l is
replayed, `modhifi.replay`); on fmnist-resnet with 500 images, `layer_errors` (9 layers × 3
masks) takes ~7 s on one CPU thread.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity
from modhifi.hooks import hooked
from modhifi.metrics import channels_last
from modhifi.prune import Analysis, ChannelGroup, Evidence
from modhifi.prune.importance import modhifi_ranking
from modhifi.replay import Replay
from modhifi.theory.lipschitz import BoundKind, Lipschitz

_REPLAY_BYTES = 2**31  # recorded activations kept for the masked runs (~0.4 GB on fmnist-resnet)


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


def global_errors(replay: Replay, layer: str, masks: Tensor, *, batch_size: int,
                  shard: Shard = ALONE) -> Tensor:
    """(n,) E‖f(x) − f_m(x)‖² over the replay's inputs for each mask (n, c_in) on `layer`'s inputs.

    Only the network from `layer` on runs again; the clean outputs are the replay's, computed in
    the same batches. With several processes (`shard`), each holds its share of the inputs and
    the squared errors and counts are summed over all of them.
    """
    calls = replay.trace.calls.get(layer, 0)
    if calls != 1:
        raise UserError(f"layer {layer} runs {calls} times per forward pass; choose a layer that "
                        "runs exactly once")
    current: list[Tensor] = []  # the mask being measured

    def mask_inputs(module: nn.Module, args: tuple) -> tuple:
        mask = current[-1][:, None, None] if isinstance(module, nn.Conv2d) else current[-1]
        return (args[0] * mask, *args[1:])  # (c_in, 1, 1) over (B, c_in, H, W), or (c_in,)

    chunks = torch.arange(len(replay.inputs), device=replay.inputs.device).split(batch_size)
    totals = torch.zeros(len(masks) + 1, dtype=torch.float64)  # per mask, then the count
    totals[-1] = len(replay.inputs)
    with replay.before(layer) as run, hooked(replay.model, before={layer: mask_inputs},
                                              private=True):
        for i, mask in enumerate(masks):
            current[:] = [mask.to(replay.inputs)]
            totals[i] = sum(float((run(index) - replay.logits[index]).double().square().sum())
                            for index in chunks)
    totals = shard.sum(totals.to(shard.device)).cpu()
    return totals[:-1] / totals[-1]


def _replay(analysis: Analysis, layers: list[str]) -> Replay:
    """The analysis' calibration images with the prefix of each layer recorded."""
    batches = analysis.calibration
    return Replay(analysis.model, channels_last(torch.cat(list(batches))), layers,
                  batch_size=len(batches[0]), channels_last=True, max_bytes=_REPLAY_BYTES)


def _check_layer(analysis: Analysis, layer: str) -> None:
    if layer not in analysis.fidelity:
        raise UserError(f"{layer!r} is not a scored consumer layer; use one of "
                        f"{', '.join(analysis.fidelity)}")


def draw_masks(c_in: int, kept: float, n: int, generator: torch.Generator) -> Tensor:
    """(n, c_in) masks keeping max(1, round(kept·c_in)) channels chosen uniformly at random."""
    keep = max(1, round(kept * c_in))
    order = torch.rand(n, c_in, generator=generator).argsort(1)
    return torch.zeros(n, c_in).scatter_(1, order[:, :keep], 1.0)


def _hifi_masks(analysis: Analysis, layer: str, kept: Sequence[float]) -> Tensor:
    """(len(kept), c_in) the union rule within one layer: the best-priority channels kept."""
    c_in = analysis.fidelity[layer].w.shape[1]
    group = ChannelGroup(layer, c_in, (), ((layer, tuple(range(c_in))),), ())
    evidence = Evidence(analysis.model, analysis.fidelity)
    order = torch.tensor(modhifi_ranking(group, evidence).order)
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
    randoms = [draw_masks(c_in, share, random_masks, generator) for share in kept]
    masks = torch.cat([_hifi_masks(analysis, layer, kept), *randoms])  # (n, c_in)
    kinds = ["hifi"] * len(kept) + ["random"] * (len(kept) * random_masks)
    # uncentred: the bound is about E‖ΔY‖², means included
    local = masked_local_error(analysis.fidelity[layer].uncentred(), masks).cpu()
    replay = _replay(analysis, [layer])
    measured = global_errors(replay, layer, masks, batch_size=len(analysis.calibration[0]),
                             shard=analysis.shard)
    constant, kind = Lipschitz(replay.model, replay.trace).after(layer)
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
    replay = _replay(analysis, layers)
    lipschitz = Lipschitz(replay.model, replay.trace)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for layer in layers:
        drawn = draw_masks(analysis.fidelity[layer].w.shape[1], kept, masks, generator)
        # uncentred: the bound is about E‖ΔY‖², means included
        local = masked_local_error(analysis.fidelity[layer].uncentred(), drawn).cpu()
        measured = global_errors(replay, layer, drawn, batch_size=len(analysis.calibration[0]),
                                 shard=analysis.shard)
        ratio = measured / local
        worst = int(ratio.nan_to_num(nan=-1.0).argmax())
        constant, kind = lipschitz.after(layer)
        rows.append((layer, float(local[worst]), float(measured[worst]), float(ratio[worst]),
                     math.nan if constant is None else constant, kind))
    frame = pd.DataFrame(rows, columns=["layer", "local_error", "global_error", "ratio",
                                        "bound_constant", "bound_kind"])
    frame["bound"] = frame.bound_constant**2 * frame.local_error
    return frame
