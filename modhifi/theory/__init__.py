"""Theory the dashboard can show (method.md §6).

- `lipschitz`: Lipschitz constants of modules and C_l, the constant of the network after a layer.
- `local_global`: local error of masking a layer's inputs (from statistics) against the measured
  global error, and the bound global ≤ C_l² · local.
- `invariance`: the feature-extractor view, relative change of each layer's output under
  translations and deformations, by depth.
- `existence`: whether small HiFi sets exist, against a random search and an untrained model.
- `report`: what `python -m modhifi theory` prints.

Input models are never modified: every pass with hooks, masks or replays runs on a private copy.
"""
from modhifi.theory.existence import (HifiExistence, RandomOrder, hifi_existence, random_search,
                                      untrained_analysis)
from modhifi.theory.invariance import deform, invariance, translate
from modhifi.theory.lipschitz import (BoundKind, Lipschitz, bound_constants, conv_lipschitz,
                                      lipschitz_table, module_lipschitz)
from modhifi.theory.local_global import (LocalGlobal, global_errors, layer_errors, local_global,
                                         masked_local_error, draw_masks)
from modhifi.theory.report import theory_report

__all__ = ["BoundKind", "HifiExistence", "Lipschitz", "RandomOrder", "LocalGlobal", "bound_constants",
           "conv_lipschitz", "deform", "global_errors", "hifi_existence", "invariance",
           "layer_errors", "lipschitz_table", "local_global", "masked_local_error",
           "module_lipschitz", "draw_masks", "random_search", "theory_report", "translate",
           "untrained_analysis"]
