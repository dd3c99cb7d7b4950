"""Forget-class scores (method.md §4.2): the centred (or contrastive) saliency of every
(output, input) pair of the edited layers, from one pass of input statistics split into the
forget class and a seeded reference sample of all classes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.data import Split
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity
from modhifi.moments import LayerMoments, collect_row_moments
from modhifi.options import REFERENCE_SAMPLES, UNLEARN_BATCH, Score, check
from modhifi.unlearn.layers import reaching_positions


def centred_forget_second(forget: LayerMoments, reference_mean: Tensor) -> Tensor:
    """E_forget Σ_p (P_p − μ_p)(P_p − μ_p)ᵀ, the second moment of the forget-class patches about the
    mean patch μ_p of all classes at each position p.

    Expanding the square needs only the forget-class sums:
    E_f Σ_p P_p P_pᵀ − (S_fᵀ μ + μᵀ S_f) / N_f + μᵀ μ, with S_f the forget-class position sums.

    Args:
        forget: moments of the layer's input on the forget-class samples.
        reference_mean: (L, d) mean patch per position over all classes
            (`reference.position_sum / reference.samples` for `LayerMoments` of all samples).

    Returns:
        (d, d) float64 matrix, the `H` of `LayerFidelity` whose saliency is the centred saliency.
    """
    mu = reference_mean.double()  # (L, d)
    cross = forget.position_sum.double().T @ mu / forget.samples  # (d, d)
    return forget.mean_second() - cross - cross.T + mu.T @ mu


@dataclass(frozen=True, eq=False)
class ForgetScores:
    """Saliency (contrastive or centred) of every (output, input) pair of the scored layers, for
    one forget class."""

    forget_class: int
    layers: tuple[str, ...]  # module names, in forward order
    saliency: tuple[Tensor, ...]  # per layer (c_out, c_in) float64 r_ci
    forget_samples: int  # calibration samples of the forget class
    reference_samples: int  # calibration samples (all classes) behind the means
    positions: tuple[int | None, ...] = ()  # per layer: how many output positions were scored
    # (None: all of them; fewer where only some reach the head, see `reaching_positions`)
    score: Score = "contrastive"

    def last(self, layers: int) -> ForgetScores:
        """The scores of the last `layers` layers only."""
        return replace(self, layers=self.layers[-layers:], saliency=self.saliency[-layers:],
                       positions=self.positions[-layers:] if self.positions else ())

    def to_frame(self) -> pd.DataFrame:
        """Long table: layer, out_channel, in_channel, saliency."""
        frames = []
        for name, r in zip(self.layers, self.saliency):
            c, i = torch.meshgrid(torch.arange(r.shape[0]), torch.arange(r.shape[1]), indexing="ij")
            frames.append(pd.DataFrame({"layer": name, "out_channel": c.flatten().numpy(),
                                        "in_channel": i.flatten().numpy(),
                                        "saliency": r.flatten().cpu().numpy()}))
        return pd.concat(frames, ignore_index=True)


def reference_index(n: int, samples: int | None, seed: int) -> Tensor:
    """Seeded uniform sample of `samples` indices out of n (all when None or ≥ n), sorted."""
    if samples is None or samples >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:samples].sort().values


def score_forget_class(model: nn.Module, calibration: Split, *, forget_class: int,
                       layers: tuple[str, ...], device: torch.device | str,
                       score: Score = "contrastive",
                       reference_samples: int | None = REFERENCE_SAMPLES,
                       batch_size: int = UNLEARN_BATCH, seed: int = 0,
                       shard: Shard = ALONE) -> ForgetScores:
    """Forget-class saliency of the given layers from one forward pass over calibration data.

    Each batch is split by label: forget-class rows feed the forget moments, rows of a seeded
    reference sample of all classes (no labels needed) the reference moments, whose
    per-position means centre both. Only the output positions that reach the head count
    (`reaching_positions`: the class token in a ViT's last block, everything in a CNN).

    Args:
        model: the network, in eval mode on `device`; not modified.
        calibration: held-out images; the labels only select the forget class.
        forget_class: the class to forget.
        layers: module names to score (see `unlearnable_layers`).
        device: where the forward passes and statistics run.
        score: `contrastive` (default): the centred saliency on the forget class minus the same
            on the reference sample, r_ci = E_f⟨Ỹ_c, Ã_ci⟩ − E_all⟨Ỹ_c, Ã_ci⟩ (~: minus the
            all-class mean), so that variation every class has cancels too; `centred`: the first
            term alone (method.md §4.2).
        reference_samples: calibration samples of all classes (seeded) behind the means and the
            contrast; None = all of them. A sample of 1,000 keeps the pass fast.
        batch_size: images per forward pass.
        seed: the reference sample's seed.
        shard: when several processes share the work (`modhifi.distributed`), each reads its own
            whole batches of the used samples and the moments are summed over all.

    Returns:
        The `ForgetScores`.
    """
    check(Score, score)
    is_forget = calibration.labels == forget_class  # (N,)
    if not is_forget.any():
        raise UserError(f"the calibration split has no samples of class {forget_class}; "
                        "pick a class that the calibration data contains")
    is_reference = torch.zeros_like(is_forget)
    is_reference[reference_index(len(calibration), reference_samples, seed)] = True
    used = (is_forget | is_reference).nonzero().squeeze(1)
    mine = used[shard.indices(len(used), batch_size)]  # this process's whole batches of them
    rows = {"forget": is_forget[mine], "reference": is_reference[mine]}  # (n_mine,) each
    example = next(calibration.subset(used[:1]).batches(1, device=device))
    positions = {name: reaching_positions(model, name, example, seed=seed) for name in layers}
    moments = collect_row_moments(model, layers, calibration.subset(mine).batches(
        batch_size, device=device), device=device, rows=rows, positions=positions)
    if shard.world > 1:  # every subset and layer on every process, in one order, then summed
        shapes = collect_row_moments(model, layers, [example], device=device,
                                     positions=positions)[None]
        moments = {key: {name: moments[key].get(name, shapes[name].nothing()).float64()
                         .summed(shard) for name in layers} for key in rows}
    saliency = []
    for name in layers:
        forget, reference = moments["forget"][name], moments["reference"][name]
        H = centred_forget_second(forget, reference.position_sum / reference.samples)
        if score == "contrastive":
            H = H - reference.centered_second()  # E_all Σ_p (P_p − μ_p)(P_p − μ_p)ᵀ
        saliency.append(LayerFidelity(H=H, weight=model.get_submodule(name).weight.detach(),
                                      lam=0.0).saliency)
    return ForgetScores(forget_class, tuple(layers), tuple(saliency), int(is_forget.sum()),
                        int(is_reference.sum()), tuple(None if p is None else len(p)
                                                       for p in positions.values()), score)

