"""One model analysed on its calibration data, once: structure, input statistics, fidelities,
and rankings computed on first use. Plans come from it and pruned copies are made from it
(score → plan → apply); the model given is only read.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modhifi.batch import Batch, head, size
from modhifi.data import reusable
from modhifi.distributed import ALONE, Shard
from modhifi.errors import UserError
from modhifi.fidelity import LayerFidelity
from modhifi.hooks import private_copy
from modhifi.moments import collect_moments
from modhifi.options import (DEFAULT_ALLOCATION, DEFAULT_METHOD, FLOOR, ROUND_TO, Allocation,
                             Compensation, Method, Scope, TargetKind)
from modhifi.prune.apply import (compensate, cut_channels, kept_inputs, recalibrate_batchnorm,
                                 refit_in_order)
from modhifi.prune.importance import Evidence, Ranking, rank
from modhifi.prune.latency import CostModel
from modhifi.prune.plan import (PrunePlan, check_costs, check_overrides, in_scope, most,
                                plan_pruning, removed_share)
from modhifi.prune.structure import Structure, trace_structure


@dataclass(frozen=True)
class Analysis:
    """Structure, input statistics and fidelities of one model, computed once; plans come from it.

    With several processes (`shard`), `apply` recalibrates BatchNorm (and sums a sequential
    refit's statistics) over all of them: every process calls it, with the same plan and
    options.
    """

    model: nn.Module = field(repr=False)   # the analysis' own eval-mode copy, never modified
    input_shape: tuple[int, ...] | Batch  # one input's shape, or a one-sample example
    structure: Structure
    # consumer -> its fidelity, on its input statistics (the only copy of their (d, d) moment)
    fidelity: dict[str, LayerFidelity] = field(repr=False)
    calibration: Sequence[Batch] = field(repr=False)  # normalised batches, on the device
    # (`data.Batches`: made again from the split at each pass, so nothing but the split is held)
    seconds: float
    caveats: tuple[str, ...] = ()  # why the numbers may mean little (see `calibration_caveats`)
    # The processes whose calibration batches the statistics sum (`calibration` is this one's).
    shard: Shard = field(default=ALONE, repr=False, compare=False)
    # (method, seed) -> rankings: they do not depend on the target, and the greedy one is costly.
    _rankings: dict[tuple[str, int], dict[str, Ranking]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    # Sessions share one Analysis: the first to ask for a ranking computes it, the others wait.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def ranking(self, method: Method, *, seed: int = 0) -> dict[str, Ranking]:
        """group name -> Ranking of its channels by `method` (computed once per method and seed)."""
        with self._lock:
            if (method, seed) not in self._rankings:
                evidence = Evidence(self.model, self.fidelity, seed)
                self._rankings[method, seed] = rank(self.structure.groups, method, evidence)
            return dict(self._rankings[method, seed])

    def plan(self, target: float, *, target_kind: TargetKind = "channels",
             allocation: Allocation = DEFAULT_ALLOCATION, method: Method = DEFAULT_METHOD,
             scope: Scope = "all", floor: float = FLOOR, round_to: int = ROUND_TO,
             seed: int = 0, overrides: Mapping[str, float] | None = None,
             costs: CostModel | None = None) -> PrunePlan:
        """The plan that removes at least `target` of the channels (or of the MACs, or of the
        latency `costs` predicts); the arguments are `plan.plan_pruning`'s, `seed` the random
        baseline's."""
        check_costs(target_kind, costs)  # before a costly ranking
        return plan_pruning(self.structure, self.ranking(method, seed=seed), target,
                            method=method, target_kind=target_kind, allocation=allocation,
                            scope=scope, floor=floor, round_to=round_to, overrides=overrides,
                            costs=costs)

    def most(self, *, target_kind: TargetKind = "channels",
             allocation: Allocation = DEFAULT_ALLOCATION, method: Method = DEFAULT_METHOD,
             scope: Scope = "all", floor: float = FLOOR, round_to: int = ROUND_TO, seed: int = 0,
             overrides: Mapping[str, float] | None = None,
             costs: CostModel | None = None) -> float:
        """The largest target a plan with these options can reach (`plan`'s arguments)."""
        check_costs(target_kind, costs)
        rankings = in_scope(self.structure, self.ranking(method, seed=seed), scope)
        check_overrides(rankings, overrides)
        return most(removed_share(self.structure, rankings, target_kind, allocation, floor,
                                  round_to, overrides, costs), monotone=target_kind != "latency")

    def apply(self, plan: PrunePlan, *, compensation: Compensation = "refit",
              recalibrate: bool = True) -> nn.Module:
        """A new, physically pruned model: compensate consumers, cut channels, recalibrate BN.

        `sequential` compensation runs about three forward passes over the calibration batches
        and an analysis' worth of statistics (`refit_in_order`): seconds, not the slider's
        milliseconds. A plan that removes nothing gives the model as it is (BatchNorm statistics
        estimated again from the calibration images would change it)."""
        pruned = private_copy(self.model)
        removed = plan.removed_channels()
        if not removed:
            return pruned
        kept = kept_inputs(self.structure, self.model, removed)
        if compensation == "sequential":
            consumers = self.structure.consumers
            refit_in_order(pruned, self.model, kept, consumers, self.calibration,
                           centered=self.structure.followed_by_norm,
                           lam=self.fidelity[consumers[0]].lam,  # the analysis' (every layer's)
                           recalibrate=recalibrate, shard=self.shard)
        else:
            compensate(pruned, self.fidelity, kept, compensation, recalibrate=recalibrate)
        cut_channels(pruned, removed, self.input_shape)
        if recalibrate:
            recalibrate_batchnorm(pruned, self.calibration, shard=self.shard)
        return pruned


def analyse(model: nn.Module, calibration: Iterable[Batch], *, device: torch.device,
            input_shape: tuple[int, ...] | None = None, lam: float = 1e-4,
            progress: Callable[[float], None] | None = None, shard: Shard = ALONE,
            structure: Structure | None = None) -> Analysis:
    """Trace the model's channel groups and score every consumer layer on calibration batches.

    Args:
        model: the trained network, on `device`; only read (the analysis works on a copy).
        calibration: normalised, unlabeled input batches: tensors, or tuples or dicts of tensors
            (`modhifi.batch`; e.g. token ids with an attention mask).
        input_shape: (C, H, W) of one input; None: the first calibration sample is the example
            the structure is traced on.
        lam: ridge strength of the compensation solves, relative to the mean diagonal.
        progress: called with the share of calibration batches read so far (for progress bars).
        shard: when several processes share the calibration data (`modhifi.distributed`):
            `calibration` is this process's batches, and the statistics are summed over all.
        structure: `trace_structure(model, input_shape)` where the caller has it already (the
            trace is seconds on large models); None: traced here.
    """
    start = time.perf_counter()
    # The analysis keeps its own eval-mode copy: the caller's model (perhaps in train mode, or
    # shared by several dashboard sessions) is only read, its BatchNorm buffers left as they are.
    model = private_copy(model)
    batches = reusable(calibration, device)  # `Batches` stream from their split at each pass
    if not shard.all(len(batches) > 0 and size(batches[0]) > 0):  # on every process
        raise UserError("the calibration set is empty" + (
            f" for one of the {shard.world} processes; give each at least one batch"
            if shard.world > 1 else "; pass at least one unlabeled sample"))
    if input_shape is None:  # inputs of any form: one calibration sample is the example
        input_shape = head(batches[0], 1)
    if structure is None:
        structure = trace_structure(model, input_shape)
    if not structure.groups:
        blocked = f" (here: {'; '.join(structure.refused)})" if structure.refused else ""
        raise UserError("this model has no channel group ModHiFi can prune: it needs a Conv2d or "
                        "Linear layer whose outputs only a Conv2d or Linear reads (through "
                        f"BatchNorm, activations or pooling){blocked}")
    consumers = structure.consumers

    def reporting():
        for done, batch in enumerate(batches, 1):
            yield batch
            if progress:
                progress(done / len(batches))

    moments = collect_moments(model, consumers, reporting(), device=device, private=True)
    fidelity = {}
    for name in consumers:  # in the same order everywhere; each layer's sums dropped once used
        summed = moments.pop(name).summed(shard)
        images = summed.samples  # over every process
        fidelity[name] = LayerFidelity.from_moments(model.get_submodule(name).weight, summed,
                                                    centered=name in structure.followed_by_norm,
                                                    lam=lam)
    return Analysis(model, input_shape, structure, fidelity, batches,
                    time.perf_counter() - start, calibration_caveats(model, images), shard)


def calibration_caveats(model: nn.Module, images: int) -> tuple[str, ...]:
    """Warnings for a calibration set that is legal but too small for the statistics to mean much.

    Args:
        model: the network to be analysed.
        images: calibration images.

    Returns:
        One line per problem (none when the set is large enough).
    """
    widths = {name: m.weight.shape[1] for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    if not widths:
        return ()
    widest = max(widths, key=widths.get)
    if images >= widths[widest]:
        return ()
    return (f"{images} calibration images are fewer than the {widths[widest]} input channels of "
            f"{widest}: its statistics cannot tell those channels apart; use at least "
            f"{widths[widest]} (more is better)",)

