"""More than one process, on PyTorch's own engine (torch.distributed): which share of the data a
process reads, and the sums that every process adds up.

Everything the data decides is a sum over samples: input moments and patch sums with their counts,
BatchNorm recalibration's per-call statistics, evaluation counts, unlearning's forget-class
moments, the theory's measured output errors. Each process reads whole batches of the one-process
order (batch i goes to process i mod N), computes each batch's terms exactly as one process would,
and the terms are summed in float64 across processes, so the result does not depend on how many
processes share the work (to float64 rounding). Everything after the statistics (scores, plan,
refit, surgery, unlearning's search of k) then runs identically on every process from the same
sums, checked where it matters (`Shard.check_same`); only process 0 prints and writes.

`torchrun --nproc-per-node N -m modhifi ...` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; `from_environment` joins them (gloo on the CPU,
NCCL on CUDA GPUs; `backend.choose_backend` gives each process the GPU of its LOCAL_RANK). A
distributed script of one's own passes its process group to `from_group`.
"""
from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
# Imported before any group exists: its functions take `group=group.WORLD` as a default, which
# would otherwise hold the group past `destroy_process_group`, so that its worker threads outlive
# the interpreter and abort the process at exit (torch._dynamo, which the FLOP counter loads,
# imports it).
import torch.distributed.nn.functional  # noqa: F401
from torch import Tensor

from modhifi.backend import Backend
from modhifi.errors import UserError

T = TypeVar("T")

# Images per calibration batch: the unit processes share, and one BatchNorm recalibration pass
# (`recalibrate_batchnorm`'s chunk), so that each batch's terms are the same however shared.
CALIBRATION_BATCH = 128


def calibration_batch(samples: int) -> int:
    """CALIBRATION_BATCH, or the next size up that leaves no lone last image of `samples`
    (BatchNorm in training mode cannot take one image of 1×1 maps)."""
    size = CALIBRATION_BATCH
    while samples > 1 and samples % size == 1:
        size += 1
    return size


def calibration_batches(samples: int) -> int:
    """How many batches of `calibration_batch(samples)` the first `samples` images make."""
    return -(-samples // calibration_batch(samples))


@dataclass(frozen=True)
class Shard:
    """This process's place among those that share the work (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group
    device: torch.device = torch.device("cpu")  # where its collectives want tensors (NCCL: GPU)

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (rank 0)."""
        return self.rank == 0

    def take(self, batches: Iterable[T]) -> Iterator[T]:
        """This process's whole batches of `batches`: every `world`-th from the `rank`-th (the
        others are skipped, but a generator still makes them: give a list, or read only this
        process's samples with `indices`)."""
        return itertools.islice(batches, self.rank, None, self.world)

    def indices(self, samples: int, batch_size: int) -> Tensor:
        """(n,) this process's sample indices of `samples`, in whole batches of `batch_size`."""
        starts = self.take(range(0, samples, batch_size))
        return torch.cat([torch.arange(start, min(start + batch_size, samples))
                          for start in starts] or [torch.zeros(0, dtype=torch.long)])

    def check_batches(self, samples: int, available: int) -> None:
        """A one-line UserError unless `samples` calibration images make at least one batch
        (`calibration_batch`) for every process, its advice within the `available` images."""
        if calibration_batches(samples) >= self.world:
            return
        least = next((n for n in range(samples + 1, available + 1)
                      if calibration_batches(n) >= self.world), None)
        advice = (f"give --calib-samples at least {least}, or start fewer" if least else
                  f"the dataset has {available}, enough for {calibration_batches(available)}")
        raise UserError(f"{samples} calibration images make too few batches of "
                        f"{calibration_batch(samples)} for {self.world} processes: {advice}")

    def sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over every process, in place (and returned)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all(self, ok: bool) -> bool:
        """Whether `ok` holds on every process (so that all of them raise, or none, instead of
        one raising while the others wait in the next collective)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([float(ok)], dtype=torch.float64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def on_main(self, work: Callable[[], T]) -> T:
        """`work()` run by process 0 alone, its result (picklable) on every process; what it
        raises is raised on every process (not only on 0, the others left waiting)."""
        if self.world == 1:
            return work()
        box: list[Any] = [None, None]  # (result, error)
        if self.is_main:
            try:
                box[0] = work()
            except Exception as error:  # handed on, then raised everywhere
                box[1] = error
        dist.broadcast_object_list(box, group=self.group, group_src=0, device=self.device)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every process unless `value` (picklable) is equal on all of them."""
        if self.world == 1:
            return
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        if any(v != values[0] for v in values):
            raise UserError(f"the {self.world} processes reached different {what} (floating "
                            "point differs between their machines); run on machines of one kind")


ALONE = Shard()
_JOINED: list[bool] = []  # [True] while this process is in a group `from_environment` made


def from_group(group: Any = None, device: torch.device | str = "cpu") -> Shard:
    """This process's `Shard` in an initialised process group (None: the default group);
    `device`: this process's GPU for NCCL, the CPU for gloo."""
    return Shard(dist.get_rank(group), dist.get_world_size(group), group, torch.device(device))


def from_environment(backend: Backend) -> Shard:
    """Join the processes torchrun started (WORLD_SIZE > 1), or work alone: NCCL between the
    GPUs `backend` chose (each process the GPU of its LOCAL_RANK), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ALONE
    if not dist.is_initialized():
        try:
            if backend.is_cuda:  # bound to this process's GPU
                dist.init_process_group("nccl", device_id=backend.device)
            else:
                dist.init_process_group("gloo")
        except (RuntimeError, ValueError) as error:
            raise UserError(f"cannot join the other {world - 1} processes ({error}); start the "
                            "command with torchrun, which sets MASTER_ADDR and MASTER_PORT") \
                from None
        _JOINED.append(True)  # ours to leave
    return from_group(device=backend.device if backend.is_cuda else "cpu")

def leave() -> None:
    """Leave the process group `from_environment` joined (a group someone else made is theirs;
    a no-op when alone). A collective call: every process calls it once its work is done."""
    if _JOINED and dist.is_initialized():
        dist.barrier()  # gloo aborts a process whose peers hang up while it still talks to them
        dist.destroy_process_group()
        # A reference cycle still holding the group (an exception's traceback, say) would keep
        # its threads running until the interpreter exits, where they abort it: free it now.
        gc.collect()
        _JOINED.clear()
