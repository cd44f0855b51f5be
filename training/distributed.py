"""Process-group setup that works unchanged as one plain process, under `deepspeed` and under `torchrun`.

Both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python -m training` gets
single-process defaults, so the same DeepSpeed engine code path runs everywhere (one process is a world of size 1).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> Dist:
    """Initialise the process group (gloo on CPU, nccl on GPU) before anything else touches DeepSpeed."""
    if "RANK" not in os.environ:  # plain single process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # N processes each using every core oversubscribe the CPU (~30% slower); launchers usually set this
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    import deepspeed

    # Init order matters on CPU: the group must exist with backend gloo BEFORE HfDeepSpeedConfig / zero.Init /
    # deepspeed.initialize, which otherwise initialise it themselves with the accelerator's default backend.
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def all_mean(value: float, dist: Dist) -> float:
    """Mean of a scalar over ranks (identical result on every rank)."""
    if dist.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / dist.world_size


def all_gather_objects(obj, dist: Dist) -> list:
    if dist.world_size == 1:
        return [obj]
    out = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out
