"""How the one Llama model is spread over ranks: the backends behind a single entry point.

``parallelize(cfg, arch, env)`` picks the backend from ``cfg.resolved_backend``: ``torch``
(DDP/FSDP2, DTensor tensor parallel, torch.distributed.pipelining; on cpu, cuda or neuron
through ``device.py``) or ``nxd``
(torch-xla + neuronx-distributed on Trainium, imported only when selected).
"""

from __future__ import annotations

from ..config import TrainerConfig
from ..presets import Architecture
from .base import ParallelModel
from .dist import DistEnv, init_distributed, shutdown_distributed
from .layout import Layout, LayoutError, make_layout

__all__ = [
    "DistEnv",
    "Layout",
    "LayoutError",
    "ParallelModel",
    "init_distributed",
    "make_layout",
    "parallelize",
    "shutdown_distributed",
]


def parallelize(cfg: TrainerConfig, arch: Architecture, env: DistEnv) -> ParallelModel:
    """Build this rank's share of the model for the configured layout and backend.

    Raises ``LayoutError`` for a layout the backend cannot run and, for the nxd backend
    without its packages, ``neuron_backend.NeuronUnavailable`` (exit code EXIT_DEPENDENCY).
    """
    if cfg.resolved_backend == "nxd":
        from .neuron_backend import parallelize_neuron

        return parallelize_neuron(cfg, arch, env)
    from .torch_backend import parallelize_torch

    return parallelize_torch(cfg, arch, env)
