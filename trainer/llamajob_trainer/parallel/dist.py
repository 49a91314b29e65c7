"""Process-group setup from the torchrun environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Long enough for a slow rank to finish a checkpoint or a first-step compile while the others
# wait in a collective; short enough that a dead peer fails the job instead of hanging it.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # process-group backend: "gloo", "nccl" or "xla"


def init_distributed(backend: str = "torch") -> DistEnv:
    """Join the job's process group.

    ``backend`` is the trainer backend ("torch" or "neuron"). Under torchrun (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` set) this joins the real group: nccl on
    CUDA, gloo on CPU, xla for Neuron. Without those variables it creates a world of one over
    an in-memory store, so the rest of the trainer (device mesh, distributed checkpoint) runs
    unchanged in a single process. Idempotent.
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nxd":
        # The xla backend needs torch_xla's device; the nxd backend resolves it.
        from .neuron_backend import init_xla_process_group

        return init_xla_process_group(rank, world, local_rank)
    if torch.cuda.is_available():
        pg_backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        pg_backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(pg_backend, timeout=PROCESS_GROUP_TIMEOUT)
        else:
            if world != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={world} but no MASTER_ADDR: start multi-process runs with torchrun"
                )
            dist.init_process_group(
                pg_backend, store=dist.HashStore(), rank=0, world_size=1,
                timeout=PROCESS_GROUP_TIMEOUT,
            )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=pg_backend,
    )


def shutdown_distributed() -> None:
    """Leave the process group cleanly.

    The barrier matters: with FSDP2 on gloo a rank that tears down while a peer still has a
    collective in flight makes the peer abort at exit.
    """
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
