"""Several processes through ``torchrun``: DistributedDataParallel training and sharded evaluation.

``torchrun --nproc-per-node N -m robench train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; we then
join a process group (NCCL on CUDA, gloo on CPU). Training splits each global batch across the
ranks and averages gradients with DDP; evaluation gives each rank every N-th batch and gathers
the per-example outcomes on rank 0. Only rank 0 writes checkpoints, logs and results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: object) -> list[object] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere); a plain list of one when alone."""
        if not self.active:
            return [obj]
        out: list[object] | None = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t)
            t /= self.world
        return t


def from_env() -> Dist:
    """Join the torchrun process group if there is one (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("ROBENCH_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(name: str, d: Dist) -> str:
    """Each rank takes its own GPU: ``cuda`` / ``auto`` becomes ``cuda:LOCAL_RANK``."""
    if d.active and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return name


def shutdown(together: bool = True) -> None:
    """Leave the process group. ``together`` (after a normal end): wait for every rank first, as a
    rank that tears gloo down while its peer still talks to it can abort the peer ("terminate
    called without an active exception"). After an error a peer may never arrive: no wait."""
    if dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()
