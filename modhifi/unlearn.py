"""ModHiFi-U, class unlearning without fine-tuning (method.md §4): forget-class statistics ->
centred saliency -> plan -> edit -> audit.

1. **Statistics.** One forward pass over calibration data: the input moments of the last `layers`
   prunable layers on the forget-class samples, and the per-position mean input over a reference
   sample of all classes (the class label only selects samples; no loss, no gradients).
2. **Score.** The centred saliency r_ci = E_forget⟨Y_c − m_c, A_ci − m_ci⟩, means m over all
   classes, so that what every class shares cancels. It is `LayerFidelity.saliency` of the matrix
   E_forget Σ_p (P_p − μ_p)(P_p − μ_p)ᵀ (μ_p the reference mean patch at position p).
3. **Plan.** The top-k (output c, input i) pairs of every scored layer, k a fraction of the layer's
   c_out·c_in pairs, chosen (unless given) as the smallest k that takes the accuracy on the
   forget-class *calibration* samples down to a target. The test split is never looked at.
4. **Edit.** Zero the kernel slices W[c, i] (BatchNorm networks) or negate them (LayerNorm /
   residual networks, where the skip path would otherwise carry the class through). The input
   model is never modified: `apply_plan` edits a deep copy.
5. **Audit** (labels allowed here): forget, retain, test and per-class accuracy on the test split,
   a membership-inference attack on the forget class and a linear probe on penultimate features.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from torch import Tensor, nn

from modhifi.data import Dataset, Split
from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity, LayerMoments, moments_of
from modhifi.metrics import Evaluation, evaluation_from

Edit = Literal["zero", "negate"]
EDITS: tuple[str, ...] = ("zero", "negate")

# Candidate k (share of a layer's (output, input) pairs) for the automatic choice: geometric with
# ratio √2 from 0.25% to 25% (the forget accuracy is not monotone in k, so the grid is fine); the
# first grid point that reaches the target is refined by bisection.
K_GRID: tuple[float, ...] = tuple(round(0.0025 * 2 ** (j / 2), 6) for j in range(14)) + (0.25,)
K_REFINE_STEPS = 3  # bisection steps in log k: the chosen k is within 2^(1/16) ≈ 4.4% of the best
_REPLAY_BYTES = 2**30  # at most 1 GiB of recorded activations for the search of k
# Edit the last 2 prunable layers before the classifier: on fmnist-resnet these are the last
# block's conv2 and shortcut, which write the classifier's features; chosen on calibration data
# (retain drop 3.2 points there vs 25-29 for 3-4 layers; docs/benchmarks/unlearn_*.csv).
DEFAULT_LAYERS = 2


# --- layers --------------------------------------------------------------------------------------

def _is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


@torch.inference_mode()
def forward_order(model: nn.Module, example: Tensor) -> list[str]:
    """Names of the prunable layers (Conv2d with groups=1, Linear) in the order they are called.

    Args:
        model: the network, in eval mode.
        example: one input batch, (B, C, H, W), already on the model's device.

    Returns:
        Module names, each once, in the order of their first call.
    """
    order: list[str] = []
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
               for name, module in model.named_modules() if _is_prunable(module)]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _classifier(model: nn.Module, order: list[str]) -> str:
    """The final classifier: the last nn.Linear a forward pass calls."""
    linears = [name for name in order if isinstance(model.get_submodule(name), nn.Linear)]
    if not linears:
        raise UserError("the model has no final nn.Linear classifier; ModHiFi-U needs one to "
                        "know which layers to edit")
    return linears[-1]


def editable_layers(model: nn.Module, example: Tensor) -> tuple[str, ...]:
    """Every prunable layer before the final classifier, in forward order.

    Args:
        model: the network, in eval mode.
        example: one input batch on the model's device.

    Returns:
        Module names.
    """
    order = forward_order(model, example)
    classifier = _classifier(model, order)
    return tuple(name for name in order if name != classifier)


def unlearnable_layers(model: nn.Module, example: Tensor, *,
                       layers: int | None = None) -> tuple[str, ...]:
    """The last `layers` prunable layers before the final classifier, in forward order.

    Args:
        model: the network, in eval mode.
        example: one input batch on the model's device.
        layers: how many layers to edit, at least 1; None = `DEFAULT_LAYERS`, or all when fewer.

    Returns:
        Module names.
    """
    candidates = editable_layers(model, example)
    if layers is None:
        layers = min(DEFAULT_LAYERS, len(candidates))
    most = len(candidates)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= most:
        raise UserError(f"layers={layers!r} is out of range: this model has {most} editable "
                        f"layers before its classifier; pass --layers 1..{most}")
    return tuple(candidates[-layers:])


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
    """Centred saliency of every (output, input) pair of the scored layers, for one forget class."""

    forget_class: int
    layers: tuple[str, ...]  # module names, in forward order
    saliency: tuple[Tensor, ...]  # per layer (c_out, c_in) float64 r_ci
    forget_samples: int  # calibration samples of the forget class
    reference_samples: int  # calibration samples (all classes) behind the means

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
                       reference_samples: int | None = 1000, batch_size: int = 256,
                       seed: int = 0) -> ForgetScores:
    """Centred saliency of the given layers from one forward pass over calibration data.

    Each batch is split by label: forget-class rows feed the second moments, reference rows the
    per-position mean input (a mean of inputs, unfolded once: unfolding is linear).

    Args:
        model: the network, in eval mode on `device`; not modified.
        calibration: held-out images; the labels only select the forget class.
        forget_class: the class to forget.
        layers: module names to score (see `unlearnable_layers`).
        device: where the forward passes and statistics run.
        reference_samples: calibration samples of all classes (seeded) whose means centre the
            scores; None = all of them. A sample of 1,000 keeps the pass fast.
        batch_size: images per forward pass.
        seed: the reference sample's seed.

    Returns:
        The `ForgetScores`.
    """
    is_forget = calibration.labels == forget_class  # (N,)
    if not is_forget.any():
        raise UserError(f"the calibration split has no samples of class {forget_class}; "
                        "pick a class that the calibration data contains")
    is_reference = torch.zeros_like(is_forget)
    is_reference[_reference_index(len(calibration), reference_samples, seed)] = True
    used = (is_forget | is_reference).nonzero().squeeze(1)
    rows = {"forget": is_forget[used].to(device), "reference": is_reference[used].to(device)}
    modules = {name: model.get_submodule(name) for name in layers}
    forget: dict[str, LayerMoments] = {}
    input_sum: dict[str, Tensor] = {}
    batch = {}  # the masks of the batch being run, read by the hooks

    def record(name: str):
        def hook(layer: nn.Module, args: tuple) -> None:
            x = args[0]  # (B, c_in, H, W) or (B, [T,] c_in)
            if batch["forget"].any():
                part = moments_of(layer, x[batch["forget"]])
                forget[name] = forget[name] + part if name in forget else part
            total = x[batch["reference"]].float().sum(0)  # (c_in, H, W) or ([T,] c_in)
            input_sum[name] = input_sum[name] + total if name in input_sum else total
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in modules.items()]
    try:
        for start, images in zip(range(0, len(used), batch_size),
                                 calibration.subset(used).batches(batch_size, device=device)):
            batch = {key: mask[start:start + len(images)] for key, mask in rows.items()}
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    n_reference = int(is_reference.sum())
    saliency = []
    for name, module in modules.items():
        mean_input = input_sum[name][None] / n_reference  # (1, c_in, H, W) or (1, [T,] c_in)
        reference_mean = moments_of(module, mean_input).position_sum  # (L, d) mean patch
        H = centred_forget_second(forget[name], reference_mean)
        saliency.append(LayerFidelity(H=H, weight=module.weight.detach(), lam=0.0).saliency)
    return ForgetScores(forget_class, tuple(layers), tuple(saliency), int(is_forget.sum()),
                        n_reference)


# --- plan and edit -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LayerEdit:
    """The kernel slices W[c, i] of one layer that the edit touches."""

    name: str
    shape: tuple[int, int]  # (c_out, c_in)
    pairs: Tensor  # (n, 2) long (output c, input i), largest centred saliency first
    saliency: Tensor  # (n,) their scores


@dataclass(frozen=True, eq=False)
class UnlearnPlan:
    """What the edit will change, shown before anything changes."""

    forget_class: int
    edit: Edit
    k: float  # share of each layer's c_out·c_in pairs
    edits: tuple[LayerEdit, ...]  # one per edited layer, in forward order
    calibration_forget_accuracy: float | None = None  # at this k, when k was chosen automatically

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


def _check_edit(edit: str) -> None:
    if edit not in EDITS:
        raise UserError(f"unknown edit {edit!r}: use zero (BatchNorm networks) or negate "
                        "(LayerNorm/residual networks)")


def plan_unlearning(scores: ForgetScores, *, k: float, edit: Edit = "zero",
                    calibration_forget_accuracy: float | None = None) -> UnlearnPlan:
    """The top-k (output, input) pairs of every scored layer by centred saliency.

    Args:
        scores: from `score_forget_class`.
        k: share of each layer's c_out·c_in pairs, in (0, 1]; at least one pair per layer.
        edit: `zero` or `negate` the selected kernel slices.
        calibration_forget_accuracy: recorded in the plan (set by `choose_k`).

    Returns:
        The `UnlearnPlan`.
    """
    _check_k(k)
    _check_edit(edit)
    layers = []
    for name, r in zip(scores.layers, scores.saliency):
        shape = (r.shape[0], r.shape[1])
        top = r.flatten().topk(_pairs_per_layer(shape, k))  # sorted, largest first
        pairs = torch.stack([top.indices // shape[1], top.indices % shape[1]], dim=1)  # (n, 2)
        layers.append(LayerEdit(name, shape, pairs.cpu(), top.values.cpu()))
    return UnlearnPlan(scores.forget_class, edit, float(k), tuple(layers),
                       calibration_forget_accuracy)


@torch.no_grad()
def _edit_in_place(model: nn.Module, plan: UnlearnPlan,
                   originals: dict[str, Tensor] | None = None) -> None:
    """Write the plan into `model`'s weights (starting from `originals` when given)."""
    for layer in plan.edits:
        weight = model.get_submodule(layer.name).weight  # (c_out, c_in[, k, k])
        if originals is not None:
            weight.copy_(originals[layer.name])
        c, i = layer.pairs.to(weight.device).unbind(1)
        if plan.edit == "zero":
            weight[c, i] = 0
        else:
            weight[c, i] = -weight[c, i]


def apply_plan(model: nn.Module, plan: UnlearnPlan) -> nn.Module:
    """A new model with the plan's kernel slices zeroed or negated; the input model is untouched.

    Args:
        model: the original network.
        plan: from `plan_unlearning` or `choose_k`.

    Returns:
        An edited deep copy, in eval mode.
    """
    edited = copy.deepcopy(model).eval()
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


@torch.inference_mode()
def _prefix_modules(model: nn.Module, first_edited: str, example: Tensor) -> list[str]:
    """The outermost modules that run once, return a tensor and finish before `first_edited` starts.

    Their outputs do not depend on the edit: the search of k records them once and replays them.
    """
    calls: dict[str, int] = {}
    finished: list[str] = []
    edited_started = []

    def before(name: str):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if name == first_edited:
                edited_started.append(True)
        return hook

    def after(name: str):
        def hook(module, args, output):
            if not edited_started and isinstance(output, Tensor):
                finished.append(name)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(before(name)),
                        module.register_forward_hook(after(name))]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    done = {name for name in finished if calls[name] == 1}
    ancestors = lambda name: {name.rsplit(".", j)[0] for j in range(1, name.count(".") + 1)}
    return [name for name in finished if name in done and not ancestors(name) & done]


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
    handles = [working.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: recorded[name].append(out)) for name in names]
    try:
        for start in range(0, len(images), batch_size):
            working(images[start:start + batch_size])
            per_image = sum(r[0][0].numel() * r[0].element_size() for r in recorded.values())
            if start == 0 and per_image * len(images) > _REPLAY_BYTES:
                return
    finally:
        for handle in handles:
            handle.remove()
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


def choose_k(model: nn.Module, scores: ForgetScores, forget_images: Split, *, edit: Edit,
             target: float = 0.0, device: torch.device | str, batch_size: int = 256,
             grid: tuple[float, ...] = K_GRID, refine: int = K_REFINE_STEPS) -> UnlearnPlan:
    """The plan with the smallest k whose edit takes accuracy on `forget_images` to ≤ `target`.

    Scans `grid` upwards, then bisects in log k between the last failing and the first passing
    grid point. Only the edited layers and what follows them are recomputed (the outputs of the
    modules before them are recorded once), an evaluation stops as soon as more than `target` of
    the images are still recognised, and images that survived an edit are tried first next time.
    When no grid point reaches the target, the grid point that leaves the fewest of a seeded
    sample of 256 images recognised is returned. The plan records its accuracy on all images.

    Args:
        model: the original network, in eval mode; not modified (a working copy is edited).
        scores: from `score_forget_class`.
        forget_images: the forget-class calibration samples (never the test split).
        edit: `zero` or `negate`.
        target: the highest acceptable accuracy on `forget_images`, in [0, 1].
        device: where the evaluations run.
        batch_size: images per forward pass.
        grid: increasing candidate k.
        refine: bisection steps after the grid scan.

    Returns:
        The chosen `UnlearnPlan`, with its `calibration_forget_accuracy`.
    """
    working = copy.deepcopy(model).eval()
    originals = {name: working.get_submodule(name).weight.detach().clone()
                 for name in scores.layers}
    images = forget_images.normalise(forget_images.images.to(device))  # (n, C, H, W)
    rows: dict[str, Tensor] = {}  # the batch's image indices, read by the replayed modules
    _install_replay(working, scores.layers[0], images, rows, batch_size=batch_size)
    labels = forget_images.labels
    n = len(labels)
    allowed = math.floor(target * n + 1e-9)  # images that may stay recognised
    order = torch.arange(n)  # hardest images (survived an edit) first
    chunk = min(batch_size, 128)  # small batches so that a failing candidate stops early
    seen: dict[tuple[int, ...], int | None] = {}  # pair counts -> count (None: above `allowed`)

    def recognised(k: float, *, among: Tensor | None = None) -> int | None:
        """How many forget images the edit at k still recognises: all of `among` are counted,
        otherwise counting stops (None) once more than `allowed` are."""
        nonlocal order
        key = tuple(_pairs_per_layer((r.shape[0], r.shape[1]), k) for r in scores.saliency)
        if among is None and key in seen:
            return seen[key]
        _edit_in_place(working, plan_unlearning(scores, k=k, edit=edit), originals)
        cap = n if among is not None else allowed
        survivors, count = [], 0
        with torch.inference_mode():
            for index in (order if among is None else among).split(chunk):
                rows["index"] = index.to(device)
                hit = working(images[rows["index"]]).argmax(1).cpu() == labels[index]  # (b,)
                survivors.append(index[hit])
                count += int(hit.sum())
                if count > cap:
                    break
        if among is None:  # images that survived go first next time
            survived = torch.cat(survivors)
            order = torch.cat([survived, order[~torch.isin(order, survived)]])
            seen[key] = count if count <= cap else None
        return count if count <= cap else None

    i = next((i for i, k in enumerate(grid) if recognised(k) is not None), None)
    if i is None:  # the target is out of reach: the k that forgets most, on a seeded sample
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:2 * chunk]
        k = min(grid, key=lambda k: recognised(k, among=sample))
        return plan_unlearning(scores, k=k, edit=edit, calibration_forget_accuracy=recognised(
            k, among=torch.arange(n)) / n)
    hi = grid[i]
    lo = grid[i - 1] if i else hi / 2
    for _ in range(refine):
        middle = math.sqrt(lo * hi)
        if recognised(middle) is None:
            lo = middle
        else:
            hi = middle
    return plan_unlearning(scores, k=hi, edit=edit, calibration_forget_accuracy=recognised(hi) / n)


# --- audit ---------------------------------------------------------------------------------------

def attack_features(logits: Tensor, labels: Tensor) -> Tensor:
    """The membership attack's features of each sample: loss, max confidence, softmax entropy.

    Args:
        logits: (N, num_classes).
        labels: (N,) true classes.

    Returns:
        (N, 3) float64.
    """
    log_p = logits.double().log_softmax(1)  # (N, K)
    p = log_p.exp()
    loss = -log_p.gather(1, labels[:, None].long())[:, 0]  # (N,)
    return torch.stack([loss, p.max(1).values, -(p * log_p).sum(1)], dim=1)


def _balanced(members: Tensor, non_members: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded subsamples of both sets down to the smaller set's size."""
    n = min(len(members), len(non_members))
    generator = torch.Generator().manual_seed(seed)
    return (members[torch.randperm(len(members), generator=generator)[:n]],
            non_members[torch.randperm(len(non_members), generator=generator)[:n]])


def membership_auc(members: Tensor, non_members: Tensor, *, seed: int = 0, folds: int = 5) -> float:
    """How well a logistic-regression attack tells members from non-members (cross-validated AUC).

    Args:
        members: (N1, F) attack features of samples the model was trained on.
        non_members: (N2, F) features of samples it never saw.
        seed: for the balancing subsample and the folds.
        folds: stratified cross-validation folds.

    Returns:
        Mean ROC AUC over the folds: ~0.5 means the attack cannot tell, 1.0 means it always can.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    members, non_members = _balanced(members, non_members, seed)
    if len(members) < 2:
        raise UserError("the membership attack needs at least 2 members and 2 non-members; "
                        "use a dataset with more samples of the forget class")
    X = torch.cat([members, non_members]).double().numpy()
    y = [1] * len(members) + [0] * len(non_members)
    folds = StratifiedKFold(n_splits=min(folds, len(members)), shuffle=True, random_state=seed)
    attack = make_pipeline(StandardScaler(), LogisticRegression())
    return float(cross_val_score(attack, X, y, cv=folds, scoring="roc_auc").mean())


def probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
          *, num_classes: int) -> Evaluation:
    """A linear probe: logistic regression on standardised features, evaluated on held-out ones.

    Args:
        train_features: (N, F) features to fit on; train_labels: (N,).
        test_features: (M, F) features to evaluate on; test_labels: (M,).
        num_classes: classes of the task.

    Returns:
        The probe's `Evaluation` on the test features (overall and per class).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a near-optimum is enough for a probe
        model.fit(train_features.double().numpy(), train_labels.numpy())
    predicted = torch.from_numpy(model.predict(test_features.double().numpy())).long()
    return evaluation_from(predicted, test_labels.long(), num_classes=num_classes)


@torch.inference_mode()
def _logits_and_features(model: nn.Module, classifier: nn.Module, split: Split, *,
                         device: torch.device | str, batch_size: int) -> tuple[Tensor, Tensor]:
    """(N, num_classes) logits and (N, F) penultimate features (the classifier's input), on CPU."""
    features: list[Tensor] = []
    handle = classifier.register_forward_pre_hook(
        lambda layer, args: features.append(args[0].reshape(len(args[0]), -1).float().cpu()))
    try:
        logits = [model(x).float().cpu() for x in split.batches(batch_size, device=device)]
    finally:
        handle.remove()
    return torch.cat(logits), torch.cat(features)


@dataclass(frozen=True)
class Audit:
    """What a model knows about the forget class (all accuracies on the full test split)."""

    forget_accuracy: float  # test samples of the forget class
    retain_accuracy: float  # test samples of every other class
    test_accuracy: float
    per_class: tuple[float, ...]
    mia_auc: float  # membership attack on the forget class: ~0.5 = members look like non-members
    probe_forget_accuracy: float  # linear probe on penultimate features, forget-class test samples
    probe_accuracy: float  # the same probe on all test samples


@dataclass(frozen=True, eq=False)
class Outputs:
    """What the audits read from one model whatever the forget class (reusable across classes)."""

    test_logits: Tensor  # (M, num_classes) on the whole test split, on the CPU
    probe: Evaluation  # linear probe on penultimate features: fit on calibration, tested on test


def model_outputs(model: nn.Module, dataset: Dataset, *, device: torch.device | str,
                  batch_size: int = 256) -> Outputs:
    """Test logits and the linear probe of one model (one pass over test and calibration splits).

    Args:
        model: the network, in eval mode on `device`.
        dataset: its dataset.
        device: where the forward passes run.
        batch_size: images per forward pass.

    Returns:
        The `Outputs`.
    """
    example = next(dataset.test.batches(1, device=device))
    classifier = model.get_submodule(_classifier(model, forward_order(model, example)))
    run = dict(device=device, batch_size=batch_size)
    test_logits, test_features = _logits_and_features(model, classifier, dataset.test, **run)
    _, calibration_features = _logits_and_features(model, classifier, dataset.calibration, **run)
    probed = probe(calibration_features, dataset.calibration.labels, test_features,
                   dataset.test.labels, num_classes=dataset.num_classes)
    return Outputs(test_logits, probed)


def audit(model: nn.Module, dataset: Dataset, *, forget_class: int, device: torch.device | str,
          batch_size: int = 256, seed: int = 0, outputs: Outputs | None = None) -> Audit:
    """Accuracies, membership attack and linear probe of one model for one forget class.

    Labels are used here (and only here). Members are forget-class training images, subsampled
    (seeded) to the number of forget-class test images, the non-members.

    Args:
        model: the network, in eval mode on `device`.
        dataset: its dataset.
        forget_class: the class that should be forgotten.
        device: where the forward passes run.
        batch_size: images per forward pass.
        seed: for the membership attack's subsample and folds.
        outputs: this model's `model_outputs`, when already computed.

    Returns:
        The `Audit`.
    """
    test, train = dataset.test, dataset.train
    outputs = outputs or model_outputs(model, dataset, device=device, batch_size=batch_size)
    predicted = outputs.test_logits.argmax(1)  # (M,)
    evaluation = evaluation_from(predicted, test.labels, num_classes=dataset.num_classes)
    is_forget = test.labels == forget_class  # (M,)
    correct = predicted == test.labels  # (M,)

    members, _ = _balanced((train.labels == forget_class).nonzero().squeeze(1),
                           is_forget.nonzero().squeeze(1), seed)
    members = members.sort().values
    with torch.inference_mode():
        member_logits = torch.cat([model(x).float().cpu() for x in train.subset(members).batches(
            batch_size, device=device)])
    mia = membership_auc(attack_features(member_logits, train.labels[members]),
                         attack_features(outputs.test_logits[is_forget], test.labels[is_forget]),
                         seed=seed)
    return Audit(forget_accuracy=float(correct[is_forget].float().mean()),
                 retain_accuracy=float(correct[~is_forget].float().mean()),
                 test_accuracy=evaluation.accuracy, per_class=evaluation.per_class, mia_auc=mia,
                 probe_forget_accuracy=outputs.probe.per_class[forget_class],
                 probe_accuracy=outputs.probe.accuracy)


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
            target_forget_accuracy: float = 0.0, reference_samples: int | None = 1000,
            batch_size: int = 256, seed: int = 0, before: Outputs | None = None) -> UnlearnResult:
    """Make `model` forget one class without fine-tuning (ModHiFi-U), and audit the result.

    Args:
        model: a trained classifier on `device`; not modified.
        dataset: its dataset (calibration samples drive the edit, test samples the audit).
        forget_class: index of the class to forget.
        device: where everything runs.
        edit: `zero` or `negate` the selected kernel slices; default by architecture
            (`default_edit`).
        layers: how many of the last prunable layers before the classifier to edit; None =
            `DEFAULT_LAYERS` (2), or all when the model has fewer.
        k: share of each edited layer's (output, input) pairs, in (0, 1]; None chooses the
            smallest k that takes the forget-class calibration accuracy to the target.
        target_forget_accuracy: that target, in [0, 1] (only used when k is None).
        reference_samples: calibration samples of all classes that centre the scores (None: all).
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
        _check_edit(edit)
    if k is not None:
        _check_k(k)
    if not 0 <= target_forget_accuracy <= 1:
        raise UserError(f"target forget accuracy {target_forget_accuracy!r} is out of range: "
                        "pass a fraction in [0, 1]")
    if reference_samples is not None and reference_samples < 1:
        raise UserError(f"reference_samples={reference_samples!r} must be at least 1 (or None "
                        "for all calibration samples)")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size!r} must be at least 1")

    begin = time.perf_counter()
    original = copy.deepcopy(model).eval()  # eval() and hooks touch only this copy
    example = next(dataset.calibration.batches(1, device=device))
    names = unlearnable_layers(original, example, layers=layers)
    edit = edit or default_edit(original)
    scores = score_forget_class(original, dataset.calibration, forget_class=forget_class,
                                layers=names, device=device, reference_samples=reference_samples,
                                batch_size=batch_size, seed=seed)
    if k is None:
        forget_images = dataset.calibration.subset(dataset.calibration.labels == forget_class)
        plan = choose_k(original, scores, forget_images, edit=edit, target=target_forget_accuracy,
                        device=device, batch_size=batch_size)
    else:
        plan = plan_unlearning(scores, k=k, edit=edit)
    edited = apply_plan(original, plan)
    seconds = time.perf_counter() - begin

    run = dict(forget_class=forget_class, device=device, batch_size=batch_size, seed=seed)
    return UnlearnResult(edited, scores, plan, audit(original, dataset, outputs=before, **run),
                         audit(edited, dataset, **run), seconds, dataset.classes)
