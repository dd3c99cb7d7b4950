"""ModHiFi-P, structured pruning without gradients or labels (method.md §3): score → plan → apply.

- `structure`: which channels must go together (Torch-Pruning's dependency graph, filtered).
- `analysis`: `analyse` collects every consumer's input statistics once and builds fidelities.
- `importance`: the registry of rankings (the paper's union of HiFi sets, greedy subset
  fidelity, baselines), one small callable each.
- `plan`: a target (a fraction of channels, of MACs or of measured latency) becomes a
  `PrunePlan`, a plain value with the exact MACs and parameters, before anything changes;
  `latency`: the cost model behind latency targets (each layer timed at candidate widths);
  `hold`: a latency target cut, timed and planned again until the measurement meets it.
- `apply`: compensation (δ*, the one-shot refit, or the sequential refit on the pruned
  network's own inputs), surgery by Torch-Pruning, BatchNorm recalibration, on a copy;
  `steps`: the iterative mode; `tables`: the analysis as tables for the pages.
"""
from modhifi.prune.analysis import Analysis, analyse, calibration_caveats
from modhifi.prune.apply import (Recordings, batchnorms, compensate, cut_channels, kept_inputs,
                                 recalibrate_batchnorm, sequential_recordings)
from modhifi.prune.importance import IMPORTANCES, Evidence, Ranking, rank
from modhifi.prune.latency import CostModel, cost_file, measured_costs
from modhifi.prune.plan import GroupPlan, PrunePlan, kept_counts, plan_pruning
from modhifi.prune.steps import prune_in_steps
from modhifi.prune.structure import ChannelGroup, Structure, dependency_graph, trace_structure

__all__ = ["IMPORTANCES", "Analysis", "batchnorms", "ChannelGroup", "CostModel", "Evidence", "GroupPlan", "PrunePlan",
           "Ranking", "Structure", "analyse", "calibration_caveats", "compensate", "cost_file",
           "cut_channels", "dependency_graph", "kept_counts", "kept_inputs", "measured_costs",
           "plan_pruning", "prune_in_steps", "Recordings",
           "rank", "recalibrate_batchnorm", "sequential_recordings", "trace_structure"]
