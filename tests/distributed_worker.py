"""Run by tests/test_distributed.py under torchrun (and alone, in pytest's process, as `main`):
one tiny seeded ResNet analysed, planned, pruned, recalibrated and evaluated by however many
processes torchrun started; process 0 saves what every process must agree on (usage: torchrun
... distributed_worker.py OUT.pt). Every process then checks that leaving the group freed it: a
group still held keeps gloo's threads running until the interpreter exits, which aborts the
process now and then (SIGABRT), so a leak must fail every run. (The threads are not what is checked: a joined thread can still be listed
in /proc for a moment after the group is freed, on a loaded machine.)"""
import sys
import weakref

import torch
import torch.distributed as dist

from modhifi import distributed, nets
from modhifi.backend import choose_backend
from modhifi.data import Split
from modhifi.metrics import evaluate
from modhifi.prune import analyse, recalibrate_batchnorm
from modhifi.prune import apply as prune_apply

BATCHES, BATCH, SHAPE = 7, 24, (1, 12, 12)  # 7 batches: shared unevenly by 2 and by 3


def data():
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(BATCH, *SHAPE, generator=generator) for _ in range(BATCHES)]
    images = torch.randint(0, 256, (150, *SHAPE), dtype=torch.uint8, generator=generator)
    test = Split(images, torch.randint(0, 10, (150,), generator=generator), (0.5,), (0.25,))
    return calibration, test


def main(out: str) -> None:
    shard = distributed.from_environment(choose_backend("cpu"))
    torch.manual_seed(0)
    model = nets.ResNet(widths=(8, 16)).eval()  # residual groups and BatchNorm
    calibration, test = data()
    recalibrate_batchnorm(model, calibration)  # the same everywhere: every process reads all
    analysis = analyse(model, shard.take(calibration), device=torch.device("cpu"),
                       input_shape=SHAPE, shard=shard)
    plan = analysis.plan(0.4, method="modhifi-greedy", round_to=1)
    pruned = analysis.apply(plan)
    sequential = analysis.apply(plan, compensation="sequential")  # collective at every layer
    frontier = prune_apply.FRONTIER_BYTES  # put back: the one-process run is in pytest's own
    prune_apply.FRONTIER_BYTES = 0 if shard.is_main else 2**31  # process 0 alone cannot record
    try:
        uneven = analysis.apply(plan, compensation="sequential")
    finally:
        prune_apply.FRONTIER_BYTES = frontier
    result = evaluate(pruned, test, device=torch.device("cpu"), num_classes=10, batch_size=32,
                      shard=shard)
    if shard.is_main:
        torch.save({"world": shard.world,
                    # per consumer: E[Σ PᵀP] and the mean patches (where centred, else None)
                    "statistics": {name: (f.uncentred().H, f.means)
                                   for name, f in analysis.fidelity.items()},
                    "kept": {g.name: g.kept for g in plan.groups},
                    "buffers": {name: b.clone() for name, b in pruned.named_buffers()},
                    "sequential": {name: p.clone() for name, p in sequential.state_dict().items()},
                    "uneven": {name: p.clone() for name, p in uneven.state_dict().items()},
                    "confusion": result.confusion, "accuracy": result.accuracy}, out)
    groups = [weakref.ref(dist.group.WORLD)] if dist.is_initialized() else []  # alone: none
    distributed.leave()
    if any(group() is not None for group in groups):
        sys.exit(f"process {shard.rank} still holds its process group after leaving")


if __name__ == "__main__":
    main(sys.argv[1])
