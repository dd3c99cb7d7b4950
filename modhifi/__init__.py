"""ModHiFi Studio: find which components of a trained network matter, then prune (ModHiFi-P) or
make it forget a class (ModHiFi-U) without gradients, labels or its training loss.

The front door: `from modhifi import analyse, layer_fidelity, unlearn, ...`. Names load their
module on first use, so `import modhifi` (and the CLI's --help) does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "choose_backend": "modhifi.backend", "Backend": "modhifi.backend",
    "load_dataset": "modhifi.data", "Dataset": "modhifi.data",
    "open_subject": "modhifi.zoo", "load_model": "modhifi.zoo", "save_checkpoint": "modhifi.zoo",
    "layer_fidelity": "modhifi.fidelity", "LayerFidelity": "modhifi.fidelity",
    "collect_moments": "modhifi.moments", "LayerMoments": "modhifi.moments",
    "analyse": "modhifi.prune", "Analysis": "modhifi.prune", "PrunePlan": "modhifi.prune",
    "prune_in_steps": "modhifi.prune",
    "unlearn": "modhifi.unlearn", "UnlearnResult": "modhifi.unlearn",
    "evaluate": "modhifi.metrics", "count_cost": "modhifi.metrics",
    "measure_latency": "modhifi.metrics",
    "theory_report": "modhifi.theory",
    "UserError": "modhifi.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modhifi' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
