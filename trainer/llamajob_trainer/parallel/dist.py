"""Process-group setup from the torchrun environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import device as devices

# Long enough for a slow rank to finish a checkpoint or a first-step compile while the others
# wait in a collective; short enough that a dead peer fails the job instead of hanging it.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # process-group backend: "gloo", "nccl", "neuron" or "xla"


def init_distributed(backend: str = "torch", device: str = "auto") -> DistEnv:
    """Join the job's process group on this rank's device.

    ``backend`` is the trainer backend ("torch" or "nxd"); ``device`` the job's device (auto,
    cpu, cuda or neuron), which the torch backend resolves through ``device.resolve`` (a missing
    device is a ``DependencyError``) and places on this rank's index; the process-group backend
    is the device's (gloo, nccl, neuron). The nxd backend ignores ``device``: it joins torch-xla's
    "xla" group on its own device. Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` set) this joins the real group. Without those variables it creates a world
    of one over an in-memory store, so the rest of the trainer (device mesh, distributed
    checkpoint) runs unchanged in a single process. Idempotent.
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nxd":
        # The xla backend needs torch_xla's device; the nxd backend resolves it.
        from .neuron_backend import init_xla_process_group

        return init_xla_process_group(rank, world, local_rank)
    # Before the process group: a missing device fails here with its own message, and the
    # neuron process-group backend exists only once torch_neuronx is imported.
    kind = devices.resolve(device)
    placed = devices.place(kind, local_rank)
    pg_backend = kind.process_group
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
        device=placed,
        backend=str(dist.get_backend()),  # the group's, should one already exist
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
