"""ModHiFi-U, class unlearning without fine-tuning (method.md §4): forget-class statistics ->
contrastive centred saliency -> plan (layers and k chosen on calibration images) -> edit -> audit.

1. **Statistics.** One forward pass over calibration data: the input moments of the last
   `MAX_LAYERS` prunable layers on the forget-class samples and on a seeded reference sample of
   all classes (the class label only selects the forget samples; no loss, no gradients). Only
   the output positions that reach the head are counted (`reaching_positions`: in a ViT's last
   block that is the class token alone).
2. **Score.** The centred saliency r_ci = E_forget⟨Y_c − m_c, A_ci − m_ci⟩, means m over all
   classes, so that what every class shares cancels (method.md §4.2); by default minus the same
   expectation over all classes (`contrastive`), so that variation every class shows cancels
   too. Both are `LayerFidelity.saliency` of a matrix of centred input moments.
3. **Plan.** The top-k (output c, input i) pairs of each of the last L scored layers, k a share of
   the layer's c_out·c_in pairs. Unless given, `choose_plan` picks for each L the smallest k
   that takes the accuracy on the forget-class *calibration* samples down to a target, and
   keeps the L whose edit changes the fewest predictions on calibration samples of the other
   classes (compared with the unedited model: no labels are read). The test split is never
   looked at.
4. **Edit.** Zero the kernel slices W[c, i] (BatchNorm networks) or negate them (LayerNorm /
   residual networks, where the skip path would otherwise carry the class through). The input
   model is never modified: `apply_plan` edits a deep copy.
5. **Audit** (`modhifi.audit`, where labels are allowed): forget, retain, test and per-class
   accuracy on the test split, a membership-inference attack on the forget class and a linear
   probe on penultimate features.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Literal

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.audit import Audit, Outputs, audit
from modhifi.data import Dataset, Split
from modhifi.errors import UserError
from modhifi.fidelity import (
    LayerFidelity,
    LayerMoments,
    classifier_name,
    forward_order,
    moments_of,
)
from modhifi.hooks import hooked, private_copy
from modhifi.options import Edit, Score, check
from modhifi.trace import trace_forward


# Candidate k (share of a layer's (output, input) pairs) for the automatic choice: geometric with
# ratio √2 from 0.25% to 25% (the forget accuracy is not monotone in k, so the grid is fine); the
# first grid point that reaches the target is refined by bisection.
K_GRID: tuple[float, ...] = tuple(round(0.0025 * 2 ** (j / 2), 6) for j in range(14)) + (0.25,)
K_REFINE_STEPS = 3  # bisection steps in log k: within 2^(1/16) ≈ 4.4% of the best passing k
# (2^(1/8) when the first grid point already passes: the bisection then starts from half of it)
# The plan edits K_MARGIN times the smallest k that forgets the calibration images: at that k some
# of them sit on the decision boundary, and unseen images of the class cross it. Chosen on
# fmnist-resnet with the calibration split halved (choose on one half, measure on the other):
# forget accuracy on the unseen half ≤ 1.6% without the margin, 0% for every class with 2^(1/4),
# at +0.5 points of mean retain drop.
K_MARGIN = 2 ** 0.25
_REPLAY_BYTES = 2**30  # at most 1 GiB of recorded activations for the search of k
# The automatic choice tries editing the last 1..MAX_LAYERS prunable layers before the classifier
# and keeps the one that forgets the calibration images with the fewest changed predictions on
# the other classes: on fmnist-resnet it picks 2-4 (docs/benchmarks/unlearn_classes.md).
MAX_LAYERS = 4
RETAIN_SAMPLES = 512  # calibration images of the other classes that judge retain damage


# --- layers --------------------------------------------------------------------------------------

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


# --- which outputs reach the head ----------------------------------------------------------------

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
    working = private_copy(model)
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


# --- statistics and scores -----------------------------------------------------------------------

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


def _reference_index(n: int, samples: int | None, seed: int) -> Tensor:
    """Seeded uniform sample of `samples` indices out of n (all when None or ≥ n), sorted."""
    if samples is None or samples >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:samples].sort().values


@torch.inference_mode()
def score_forget_class(model: nn.Module, calibration: Split, *, forget_class: int,
                       layers: tuple[str, ...], device: torch.device | str,
                       score: Score = "contrastive", reference_samples: int | None = 1000,
                       batch_size: int = 128, seed: int = 0) -> ForgetScores:
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

    Returns:
        The `ForgetScores`.
    """
    check(Score, score)
    is_forget = calibration.labels == forget_class  # (N,)
    if not is_forget.any():
        raise UserError(f"the calibration split has no samples of class {forget_class}; "
                        "pick a class that the calibration data contains")
    is_reference = torch.zeros_like(is_forget)
    is_reference[_reference_index(len(calibration), reference_samples, seed)] = True
    used = (is_forget | is_reference).nonzero().squeeze(1)
    rows = {"forget": is_forget[used].to(device), "reference": is_reference[used].to(device)}
    modules = {name: model.get_submodule(name) for name in layers}
    example = next(calibration.subset(used[:1]).batches(1, device=device))
    positions = {name: reaching_positions(model, name, example, seed=seed) for name in layers}
    moments: dict[str, dict[str, LayerMoments]] = {"forget": {}, "reference": {}}
    batch = {}  # the masks of the batch being run, read by the hooks

    def record(name: str):
        def hook(layer: nn.Module, args: tuple) -> None:
            x = args[0]  # (B, c_in, H, W) or (B, [T,] c_in)
            for key, store in moments.items():
                if batch[key].any():
                    part = moments_of(layer, x[batch[key]], positions=positions[name])
                    store[name] = store[name] + part if name in store else part
        return hook

    with hooked(model, before={name: record(name) for name in layers}) as run:
        for start, images in zip(range(0, len(used), batch_size),
                                 calibration.subset(used).batches(batch_size, device=device)):
            batch = {key: mask[start:start + len(images)] for key, mask in rows.items()}
            run(images)
    saliency = []
    for name, module in modules.items():
        forget, reference = moments["forget"][name], moments["reference"][name]
        H = centred_forget_second(forget, reference.position_sum / reference.samples)
        if score == "contrastive":
            H = H - reference.centered_second()  # E_all Σ_p (P_p − μ_p)(P_p − μ_p)ᵀ
        saliency.append(LayerFidelity(H=H, weight=module.weight.detach(), lam=0.0).saliency)
    return ForgetScores(forget_class, tuple(layers), tuple(saliency), int(is_forget.sum()),
                        int(is_reference.sum()), tuple(None if p is None else len(p)
                                                       for p in positions.values()), score)


# --- plan and edit -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LayerEdit:
    """The kernel slices W[c, i] of one layer that the edit touches."""

    name: str
    shape: tuple[int, int]  # (c_out, c_in)
    pairs: Tensor  # (n, 2) long (output c, input i), largest saliency first
    saliency: Tensor  # (n,) their scores


@dataclass(frozen=True, eq=False)
class UnlearnPlan:
    """What the edit will change, shown before anything changes."""

    forget_class: int
    edit: Edit
    k: float  # share of each layer's c_out·c_in pairs
    edits: tuple[LayerEdit, ...]  # one per edited layer, in forward order
    calibration_forget_accuracy: float | None = None  # when chosen on calibration images
    calibration_retain_agreement: float | None = None  # share of retain predictions unchanged

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the edited layers."""
        return tuple(layer.name for layer in self.edits)

    def to_frame(self) -> pd.DataFrame:
        """One row per edited slice: layer, out_channel, in_channel, saliency, edit."""
        return pd.DataFrame([
            {"layer": layer.name, "out_channel": c, "in_channel": i, "saliency": r,
             "edit": self.edit}
            for layer in self.edits
            for (c, i), r in zip(layer.pairs.tolist(), layer.saliency.tolist())])


def _pairs_per_layer(shape: tuple[int, int], k: float) -> int:
    """How many of a layer's c_out·c_in pairs a share k selects (at least one)."""
    return max(1, round(k * shape[0] * shape[1]))


def _check_k(k: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise UserError(f"k={k!r} is out of range: pass a share of each layer's (output, input) "
                        "pairs in (0, 1], e.g. --k 0.03, or leave it out to choose it "
                        "automatically")


def plan_unlearning(scores: ForgetScores, *, k: float, edit: Edit = "zero") -> UnlearnPlan:
    """The top-k (output, input) pairs of every scored layer by saliency.

    Args:
        scores: from `score_forget_class`.
        k: share of each layer's c_out·c_in pairs, in (0, 1]; at least one pair per layer.
        edit: `zero` or `negate` the selected kernel slices.

    Returns:
        The `UnlearnPlan`.
    """
    _check_k(k)
    check(Edit, edit)
    layers = []
    for name, r in zip(scores.layers, scores.saliency):
        shape = (r.shape[0], r.shape[1])
        top = r.flatten().topk(_pairs_per_layer(shape, k))  # sorted, largest first
        pairs = torch.stack([top.indices // shape[1], top.indices % shape[1]], dim=1)  # (n, 2)
        layers.append(LayerEdit(name, shape, pairs.cpu(), top.values.cpu()))
    return UnlearnPlan(scores.forget_class, edit, float(k), tuple(layers))


@torch.no_grad()
def _edit_in_place(model: nn.Module, plan: UnlearnPlan,
                   originals: dict[str, Tensor] | None = None) -> None:
    """Write the plan into `model`'s weights, after restoring the layers of `originals` (name ->
    weight) when given."""
    for name, weight in (originals or {}).items():
        model.get_submodule(name).weight.copy_(weight)
    for layer in plan.edits:
        weight = model.get_submodule(layer.name).weight  # (c_out, c_in[, k, k])
        c, i = layer.pairs.to(weight.device).unbind(1)
        if plan.edit == "zero":
            weight[c, i] = 0
        else:
            weight[c, i] = -weight[c, i]


def apply_plan(model: nn.Module, plan: UnlearnPlan) -> nn.Module:
    """A new model with the plan's kernel slices zeroed or negated; the input model is untouched.

    Args:
        model: the original network.
        plan: from `plan_unlearning` or `choose_plan`.

    Returns:
        An edited deep copy, in eval mode.
    """
    edited = private_copy(model)
    _edit_in_place(edited, plan)
    return edited


def default_edit(model: nn.Module) -> Edit:
    """`negate` when the model has a LayerNorm (Transformers), else `zero` (BatchNorm networks)."""
    return "negate" if any(isinstance(m, nn.LayerNorm) for m in model.modules()) else "zero"


class _Replay(nn.Module):
    """Stands in for a module whose output was recorded: returns the rows of the current batch."""

    def __init__(self, outputs: Tensor, rows: dict[str, Tensor]):
        super().__init__()
        self.outputs, self.rows = outputs, rows  # (N, ...) recorded; rows["index"] (b,) current
        self.mode: Literal["copy", "unused", "noise"] = "copy"
        self.spare = outputs[:0]  # "unused": a buffer of the right shape, whatever it holds

    def forward(self, *args, **kwargs) -> Tensor:
        index = self.rows["index"]
        shape = (len(index), *self.outputs.shape[1:])
        if self.mode == "copy":
            return self.outputs[index]  # a copy, so in-place ops downstream are harmless
        if self.mode == "noise":
            return 100 * torch.randn(shape, dtype=self.outputs.dtype, device=self.outputs.device)
        if len(self.spare) < len(index):
            self.spare = self.outputs.new_zeros(shape)
        return self.spare[:len(index)]


def _prefix_modules(model: nn.Module, first_edited: str, example: Tensor) -> list[str]:
    """The outermost modules that run once, return a tensor and finish before `first_edited` starts.

    Their outputs do not depend on the edit: the search of k records them once and replays them.
    """
    run = trace_forward(model, example)
    begin = run.start[first_edited]
    done = {name for name, end in run.end.items()
            if end < begin and run.calls[name] == 1 and name in run.returns_tensor}
    ancestors = lambda name: {name.rsplit(".", j)[0] for j in range(1, name.count(".") + 1)}
    return [name for name in sorted(done, key=run.end.get) if not ancestors(name) & done]


@torch.inference_mode()
def _install_replay(working: nn.Module, first_edited: str, images: Tensor,
                    rows: dict[str, Tensor], *, batch_size: int) -> None:
    """Record the outputs of `working`'s prefix modules on `images` and swap in `_Replay`s.

    Replayed outputs that no later computation reads (large random replacements of all of them
    together leave the logits unchanged) are not copied at all. Nothing is swapped (the search
    then runs whole forward passes) when the recording would exceed `_REPLAY_BYTES` or the
    replayed model fails on a probe batch.
    """
    names = _prefix_modules(working, first_edited, images[:1])
    recorded: dict[str, list[Tensor]] = {name: [] for name in names}
    keep = {name: lambda m, a, out, name=name: recorded[name].append(out) for name in names}
    with hooked(working, after=keep, private=True) as run:
        for start in range(0, len(images), batch_size):
            run(images[start:start + batch_size])
            per_image = sum(r[0][0].numel() * r[0].element_size() for r in recorded.values())
            if start == 0 and per_image * len(images) > _REPLAY_BYTES:
                return
    originals = {name: working.get_submodule(name) for name in names}
    replays = {name: _Replay(torch.cat(recorded.pop(name)), rows) for name in names}
    for name, module in replays.items():
        parent, _, child = name.rpartition(".")
        setattr(working.get_submodule(parent), child, module)
    rows["index"] = torch.arange(min(4, len(images)), device=images.device)
    probe = lambda: working(images[rows["index"]])  # noqa: E731
    try:
        expected = probe()
        unused = []
        for replay in replays.values():
            replay.mode = "noise"
            if torch.equal(probe(), expected):
                unused.append(replay)
            replay.mode = "copy"
        for replay in unused:
            replay.mode = "noise"
        if not torch.equal(probe(), expected):  # they matter together: copy them all
            unused = []
        for replay in replays.values():
            replay.mode = "unused" if replay in unused else "copy"
            if replay.mode == "unused":
                replay.outputs = replay.outputs[:1].clone()  # keep the shape, free the recording
    except (AttributeError, RuntimeError, TypeError):  # a parent reads its child's attributes
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(working.get_submodule(parent), child, module)


class _Search:
    """A working copy whose scored layers are edited in place, the modules before them replayed
    from a recording, to count what an edit does on forget- and retain-class calibration images.
    """

    def __init__(self, model: nn.Module, scores: ForgetScores, forget_images: Split,
                 retain_images: Split | None, *, device: torch.device | str, batch_size: int):
        self.working = private_copy(model)
        self.originals = {name: self.working.get_submodule(name).weight.detach().clone()
                          for name in scores.layers}
        both = [forget_images] + ([retain_images] if retain_images is not None else [])
        self.images = forget_images.normalise(
            torch.cat([split.images for split in both]).to(device))  # (n_f + n_r, C, H, W)
        self.rows: dict[str, Tensor] = {}  # the batch's image indices, read by the replays
        _install_replay(self.working, scores.layers[0], self.images, self.rows,
                        batch_size=batch_size)
        self.forget_class = scores.forget_class
        self.forget = torch.arange(len(forget_images))  # hardest images (survived) first
        self.retain = torch.arange(len(forget_images), len(self.images))
        self.chunk = min(batch_size, 64)  # small batches so that a failing edit stops early
        self.original = self._predict(self.retain)  # (n_r,) what the unedited model says
        self.seen: dict[tuple, int | None] = {}

    @torch.inference_mode()
    def _predict(self, index: Tensor) -> Tensor:
        predicted = []
        for part in index.split(self.chunk):
            self.rows["index"] = part.to(self.images.device)
            predicted.append(self.working(self.images[self.rows["index"]]).argmax(1).cpu())
        return torch.cat(predicted) if predicted else index

    @torch.no_grad()
    def _apply(self, plan: UnlearnPlan) -> None:
        _edit_in_place(self.working, plan, self.originals)

    @torch.inference_mode()
    def recognised(self, plan: UnlearnPlan, *, cap: int, among: Tensor | None = None) -> int | None:
        """How many forget images the edited model still classifies as the forget class.

        Counting stops (None) once more than `cap` are; without `among`, all forget images are
        tried, those that survived an earlier edit first.
        """
        key = (plan.layers, tuple(len(layer.pairs) for layer in plan.edits), cap)
        if among is None and key in self.seen:
            return self.seen[key]
        self._apply(plan)
        survivors, count = [], 0
        for index in (self.forget if among is None else among).split(self.chunk):
            self.rows["index"] = index.to(self.images.device)
            predicted = self.working(self.images[self.rows["index"]]).argmax(1).cpu()  # (b,)
            hit = predicted == self.forget_class
            survivors.append(index[hit])
            count += int(hit.sum())
            if count > cap:
                break
        if among is None:
            survived = torch.cat(survivors)
            self.forget = torch.cat([survived, self.forget[~torch.isin(self.forget, survived)]])
            self.seen[key] = count if count <= cap else None
        return count if count <= cap else None

    def agreement(self, plan: UnlearnPlan) -> float:
        """Share of the retain images on which the edited model predicts what the original did."""
        self._apply(plan)
        return float((self._predict(self.retain) == self.original).float().mean())


def other_classes(calibration: Split, *, forget_class: int, samples: int | None = RETAIN_SAMPLES,
                  seed: int = 0) -> Split:
    """A seeded sample of the calibration images that are not of the forget class.

    Args:
        calibration: the calibration split; its labels are only compared with `forget_class`.
        forget_class: the class to forget.
        samples: how many (None or more than there are: all of them).
        seed: for the sample.

    Returns:
        The sample, in calibration order.
    """
    others = (calibration.labels != forget_class).nonzero().squeeze(1)
    return calibration.subset(others[_reference_index(len(others), samples, seed)])


def _smallest_passing(passes, grid: tuple[float, ...], refine: int) -> float | None:
    """The smallest k of `grid` for which `passes(k)`, refined by bisection in log k towards the
    grid point below (None when no grid point passes)."""
    i = next((i for i, k in enumerate(grid) if passes(k)), None)
    if i is None:
        return None
    hi = grid[i]
    lo = grid[i - 1] if i else hi / 2
    for _ in range(refine):
        middle = math.sqrt(lo * hi)
        lo, hi = (middle, hi) if not passes(middle) else (lo, middle)
    return hi


def choose_plan(model: nn.Module, scores: ForgetScores, forget_images: Split, *, edit: Edit,
                target: float = 0.0, retain_images: Split | None = None,
                layer_counts: tuple[int, ...] | None = None, device: torch.device | str,
                batch_size: int = 128, grid: tuple[float, ...] = K_GRID,
                refine: int = K_REFINE_STEPS, margin: float = K_MARGIN) -> UnlearnPlan:
    """The plan that forgets on calibration images: how many layers, and k for them.

    For each number L of last layers: the smallest k whose edit takes the accuracy on
    `forget_images` to ≤ `target` (the grid scanned upwards, then bisection in log k between
    the last failing and the first passing grid point), times `margin` unless that breaks the
    target. Of the L that reach the target, the one whose edit changes the fewest predictions on
    `retain_images` (agreement with the unedited model, so no labels are read) wins; ties and
    the absence of retain images go to fewer layers. When no L reaches the target, the (L, k)
    that leaves the fewest of a seeded sample of 256 forget images recognised is returned. Only
    the edited layers and what follows them are recomputed, and an evaluation stops as soon as
    more than `target` of the images are still recognised.

    Args:
        model: the original network, in eval mode; not modified (a working copy is edited).
        scores: from `score_forget_class`, for the largest candidate set of layers.
        forget_images: the forget-class calibration samples (never the test split).
        edit: `zero` or `negate`.
        target: the highest acceptable accuracy on `forget_images`, in [0, 1].
        retain_images: calibration samples of the other classes (their labels are not read).
        layer_counts: the candidate L, each ≤ len(scores.layers); None = all of scores.layers.
        device: where the evaluations run.
        batch_size: images per forward pass.
        grid: increasing candidate k.
        refine: bisection steps after the grid scan.
        margin: factor (≥ 1) on the smallest passing k, so unseen images are forgotten too.

    Returns:
        The chosen `UnlearnPlan`, with its calibration forget accuracy and retain agreement.
    """
    counts = layer_counts or (len(scores.layers),)
    search = _Search(model, scores, forget_images, retain_images, device=device,
                     batch_size=batch_size)
    n = len(forget_images)
    allowed = math.floor(target * n + 1e-9)  # images that may stay recognised

    def plan(count: int, k: float) -> UnlearnPlan:
        return plan_unlearning(scores.last(count), k=k, edit=edit)

    def passes(count: int, k: float) -> bool:
        return search.recognised(plan(count, k), cap=allowed) is not None

    reached = []
    for count in counts:
        k = _smallest_passing(lambda k: passes(count, k), grid, refine)
        if k is not None:  # with the margin unless that breaks the target (k is not monotone)
            reached.append(plan(count, min(1.0, k * margin) if passes(count, min(1.0, k * margin))
                                else k))
    if reached:
        chosen = reached[0] if retain_images is None or len(reached) == 1 else max(
            reached, key=search.agreement)
    else:  # the target is out of reach: the edit that forgets most, on a seeded sample
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256]
        chosen = min((plan(count, k) for count in counts for k in grid),
                     key=lambda p: search.recognised(p, cap=n, among=sample))
    forget_accuracy = search.recognised(chosen, cap=n, among=torch.arange(n)) / n
    agreement = search.agreement(chosen) if retain_images is not None else None
    return replace(chosen, calibration_forget_accuracy=forget_accuracy,
                   calibration_retain_agreement=agreement)


# --- the entry point -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class UnlearnResult:
    """The edited model, what was changed, and the audit before and after."""

    model: nn.Module  # the edited copy
    scores: ForgetScores
    plan: UnlearnPlan
    before: Audit
    after: Audit
    seconds: float  # wall time of statistics + plan (including the choice of k) + edit
    classes: tuple[str, ...]

    def to_frame(self) -> pd.DataFrame:
        """One row per audit figure: metric, before, after."""
        names = {"forget_accuracy": "forget accuracy", "retain_accuracy": "retain accuracy",
                 "test_accuracy": "test accuracy", "mia_auc": "membership attack AUC",
                 "probe_forget_accuracy": "probe accuracy (forget class)",
                 "probe_accuracy": "probe accuracy (all classes)"}
        return pd.DataFrame([{"metric": label, "before": getattr(self.before, key),
                              "after": getattr(self.after, key)} for key, label in names.items()])

    def per_class_frame(self) -> pd.DataFrame:
        """One row per class: class, before, after (test accuracy)."""
        return pd.DataFrame({"class": self.classes, "before": self.before.per_class,
                             "after": self.after.per_class})

    def summary(self, *, model: str, device: str) -> dict:
        """The flat dict of the `unlearn` command (contract.md), given model and device names."""
        return {"model": model, "forget_class": self.plan.forget_class, "edit": self.plan.edit,
                "layers": len(self.plan.layers), "k": self.plan.k, "device": device,
                "forget_accuracy_before": self.before.forget_accuracy,
                "forget_accuracy_after": self.after.forget_accuracy,
                "retain_accuracy_before": self.before.retain_accuracy,
                "retain_accuracy_after": self.after.retain_accuracy,
                "mia_before": self.before.mia_auc, "mia_after": self.after.mia_auc,
                "probe_accuracy_before": self.before.probe_forget_accuracy,
                "probe_accuracy_after": self.after.probe_forget_accuracy,
                "seconds": self.seconds}


def unlearn(model: nn.Module, dataset: Dataset, *, forget_class: int, device: torch.device | str,
            edit: Edit | None = None, layers: int | None = None, k: float | None = None,
            score: Score = "contrastive", target_forget_accuracy: float = 0.0,
            reference_samples: int | None = 1000, retain_samples: int | None = RETAIN_SAMPLES,
            batch_size: int = 128, seed: int = 0, before: Outputs | None = None) -> UnlearnResult:
    """Make `model` forget one class without fine-tuning (ModHiFi-U), and audit the result.

    Args:
        model: a trained classifier on `device`; not modified.
        dataset: its dataset (calibration samples drive the edit, test samples the audit).
        forget_class: index of the class to forget.
        device: where everything runs.
        edit: `zero` or `negate` the selected kernel slices; default by architecture
            (`default_edit`).
        layers: how many of the last prunable layers before the classifier to edit; None =
            chosen with k (`choose_plan`) among 1..`MAX_LAYERS` (all `MAX_LAYERS` when k is
            given).
        k: share of each edited layer's (output, input) pairs, in (0, 1]; None chooses the
            smallest k that takes the forget-class calibration accuracy to the target.
        score: `contrastive` (default) or `centred` (`score_forget_class`).
        target_forget_accuracy: that target, in [0, 1] (only used when k is None).
        reference_samples: calibration samples of all classes that centre the scores (None: all).
        retain_samples: calibration samples of the other classes (seeded; labels unread beyond
            "not the forget class") whose changed predictions decide the number of layers; None =
            all of them.
        batch_size: images per forward pass.
        seed: for the reference sample and the membership attack.
        before: `model_outputs` of `model`, to reuse across forget classes.

    Returns:
        The `UnlearnResult`; `seconds` times statistics, plan and edit, not the audits.
    """
    classes = dataset.num_classes
    if isinstance(forget_class, bool) or not isinstance(forget_class, int) or \
            not 0 <= forget_class < classes:
        raise UserError(f"forget class {forget_class!r} is out of range for {dataset.name} "
                        f"({classes} classes): pass --forget-class 0..{classes - 1}")
    if edit is not None:
        check(Edit, edit)
    if k is not None:
        _check_k(k)
    if not 0 <= target_forget_accuracy <= 1:
        raise UserError(f"target forget accuracy {target_forget_accuracy!r} is out of range: "
                        "pass a fraction in [0, 1] (--forget-target)")
    check(Score, score)
    for name, samples in (("reference_samples", reference_samples),
                          ("retain_samples", retain_samples)):
        if samples is not None and samples < 1:
            raise UserError(f"{name}={samples!r} must be at least 1 (or None for all "
                            "calibration samples)")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size!r} must be at least 1")

    begin = time.perf_counter()
    # eval() and hooks touch only this copy; channels-last convolutions are ~1.7x faster on a CPU
    original = private_copy(model).to(memory_format=torch.channels_last)
    example = next(dataset.calibration.batches(1, device=device))
    edit = edit or default_edit(original)
    names = unlearnable_layers(original, example, layers=layers, edit=edit)
    scores = score_forget_class(original, dataset.calibration, forget_class=forget_class,
                                layers=names, device=device, score=score,
                                reference_samples=reference_samples, batch_size=batch_size,
                                seed=seed)
    if k is None:
        calibration = dataset.calibration
        plan = choose_plan(original, scores, calibration.subset(calibration.labels == forget_class),
                           edit=edit, target=target_forget_accuracy,
                           retain_images=other_classes(calibration, forget_class=forget_class,
                                                       samples=retain_samples, seed=seed),
                           layer_counts=tuple(range(1, len(names) + 1)) if layers is None
                           else None, device=device, batch_size=batch_size)
    else:
        plan = plan_unlearning(scores, k=k, edit=edit)
    edited = apply_plan(model, plan)  # in the caller's memory format
    seconds = time.perf_counter() - begin

    run = dict(forget_class=forget_class, device=device, batch_size=batch_size, seed=seed)
    return UnlearnResult(edited, scores, plan, audit(original, dataset, outputs=before, **run),
                         audit(edited, dataset, **run), seconds, dataset.classes)
