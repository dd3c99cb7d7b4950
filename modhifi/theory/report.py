"""What `python -m modhifi theory` prints: local/global errors per layer and HiFi existence."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from modhifi.data import Dataset
from modhifi.distributed import ALONE, Shard, calibration_batch
from modhifi.errors import UserError
from modhifi.options import CALIBRATION_THEORY, HIFI_LEVEL, HIFI_SHARE
from modhifi.prune import analyse
from modhifi.prune.tables import hifi_table
from modhifi.theory.existence import UNTRAINED_IMAGES, untrained_analysis
from modhifi.theory.local_global import layer_errors



def _plain(value: float) -> float | None:
    """JSON has no NaN: unknown numbers become null."""
    return None if value is None or math.isnan(value) else float(value)


def theory_report(model: nn.Module, dataset: Dataset, *, device: torch.device, name: str = "model",
                  calib_samples: int | None = None, kept: float = 0.5, masks: int = 3,
                  build: Callable[[], nn.Module] | None = None, seed: int = 0,
                  shard: Shard = ALONE) -> dict:
    """What `python -m modhifi theory` prints: local/global errors per layer and HiFi existence.

    Args:
        model: the network (eval mode, on `device`); not modified.
        dataset: its dataset; the first `calib_samples` calibration images are used
            (default: 500, or all if fewer).
        name: the model's name in the report.
        kept, masks: each consumer layer gets `masks` random masks keeping `kept` of its inputs;
            the worst global/local ratio is reported.
        build: builds the architecture untrained; adds `hifi_share_untrained`.
        shard: when several processes share the work (`modhifi.distributed`): each reads its
            whole batches of the calibration images; the moments and the measured global errors
            are summed over all; the untrained architecture (on the first 256 images) and
            everything else run alike on every process.

    Returns:
        model, layers ([{layer, local_error, global_error, ratio, bound_constant, bound_kind}]),
        max_ratio, hifi_share (share of layers where < 20% of inputs reach fidelity ≥ 0.8, median
        over output channels), calib_samples, kept, masks, seconds (and hifi_share_untrained).
    """
    calibration = dataset.calibration
    calib_samples = min(CALIBRATION_THEORY, len(calibration)) if calib_samples is None \
        else calib_samples
    if not 0 < calib_samples <= len(calibration):
        raise UserError(f"calibration samples {calib_samples} must be between 1 and "
                        f"{len(calibration)} for {dataset.name}")
    if not 0 < kept < 1:
        raise UserError(f"kept share {kept} must be in (0, 1): the share of inputs a mask keeps")
    shard.check_batches(calib_samples, len(calibration))
    size = calibration_batch(calib_samples)  # each process reads whole batches
    start = time.perf_counter()
    mine = calibration.subset(shard.indices(calib_samples, size))
    analysis = analyse(model, list(mine.batches(size, device=device)), device=device,
                       input_shape=dataset.input_shape, shard=shard)
    errors = layer_errors(analysis, kept=kept, masks=masks, seed=seed)
    hifi = hifi_table(analysis, level=HIFI_LEVEL)
    report = {
        "model": name,
        "layers": [{"layer": row.layer, "local_error": row.local_error,
                    "global_error": row.global_error, "ratio": _plain(row.ratio),
                    "bound_constant": _plain(row.bound_constant), "bound_kind": row.bound_kind}
                   for row in errors.itertuples()],
        "max_ratio": _plain(errors.ratio.max()),
        "hifi_share": float((hifi.hifi_share < HIFI_SHARE).mean()),
        "calib_samples": calib_samples, "kept": kept, "masks": masks,
    }
    if build is not None:
        first = calibration.subset(slice(0, min(UNTRAINED_IMAGES, calib_samples)))
        untrained = untrained_analysis(build, analysis, seed=seed,
                                       batches=list(first.batches(128, device=device)))
        report["hifi_share_untrained"] = float(
            (hifi_table(untrained, level=HIFI_LEVEL).hifi_share < HIFI_SHARE).mean())
    report["seconds"] = time.perf_counter() - start
    return report
