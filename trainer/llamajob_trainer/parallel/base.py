"""What every backend hands to the training loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .layout import Layout

if TYPE_CHECKING:
    from ..checkpoint import StateIO


class ParallelModel(ABC):
    """The model as this rank sees it, plus the two operations of a training step.

    ``model_parts`` are the modules this rank owns (one per pipeline stage it holds; one in
    total without pipeline parallelism). Their FQNs are the model's, so the optimizer and
    ``torch.distributed.checkpoint.state_dict.get_state_dict(model_parts, optimizers)`` see
    the same keys in every layout.
    """

    model_parts: list[nn.Module]
    layout: Layout
    dp_rank: int
    dp_size: int
    tp_size: int
    pp_size: int
    # The library of the fp32 CPU linears ("onednn" or "aten", see ``cpu_linear``), recorded in
    # checkpoints; None where the choice does not apply (other devices, tensor parallel, bf16).
    cpu_matmul: str | None = None
    cpu_matmul_seconds: dict[str, float] = {}

    def use_cpu_matmul(self, library: str, seconds: dict[str, float] | None = None) -> None:
        """Run the model's fp32 CPU linears on ``library`` (before the first step: compiled
        blocks trace the choice). ``seconds``: the timings it was chosen by, for the log."""
        from .. import cpu_linear

        if library not in cpu_linear.LIBRARIES:
            raise ValueError(f"CPU matmul library {library!r}: use one of "
                             f"{', '.join(cpu_linear.LIBRARIES)}")
        for part in self.model_parts:
            cpu_linear.use_onednn(part, library == "onednn")
        self.cpu_matmul = library
        self.cpu_matmul_seconds = dict(seconds or {})

    @abstractmethod
    def forward_backward(self, micro_batches: list[tuple[Tensor, Tensor]]) -> float:
        """Forward and backward over one optimizer step's micro-batches (this DP rank's
        ``(input_ids[mbs, seq], labels[mbs, seq])`` pairs), accumulating gradients.

        The loss is the mean token cross-entropy over the global batch, so the gradients equal
        those of one process running the whole batch. Returns that loss, the same on all ranks:
        a float, or on the nxd backend a value that ``float()`` reads once the step's last graph
        (the optimizer's) has run, so the host never waits for the backward graphs alone.
        """

    @abstractmethod
    def evaluate(self, micro_batches: list[tuple[Tensor, Tensor]]) -> tuple[float, int]:
        """Forward only, without gradients, over one global batch (this DP rank's
        micro-batches, as for ``forward_backward``). Returns the summed token cross-entropy and
        the number of tokens over the whole global batch, the same on all ranks."""

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm across all ranks; scales gradients to ``max_norm`` if it is
        exceeded. ``max_norm <= 0`` only computes the norm."""

    def make_optimizer(
        self, optimizer_cls: type[torch.optim.Optimizer], params: Iterable[Any], **defaults: Any
    ) -> torch.optim.Optimizer:
        """Build the optimizer over ``params`` (parameters or param groups of
        ``self.parameters()``). The torch backend builds it as is; the nxd backend wraps it
        in NxD's optimizer (ZeRO-1 sharding, gradient reduction and clipping inside ``step``)."""
        return optimizer_cls(params, **defaults)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Clip to ``max_norm`` (<= 0: no clipping), step, and return the pre-clip global
        gradient norm. Works on every backend; ``clip_grad_norm`` + ``optimizer.step()`` is
        the same thing on the torch backend."""
        norm = self.clip_grad_norm(max_norm)
        optimizer.step()
        return norm

    @abstractmethod
    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one (a one-element all-reduce),
        so that all ranks take the same branch at a step boundary."""

    def state_io(self) -> StateIO:
        """How checkpoints write and read this model's state: torch.distributed.checkpoint
        (``checkpoint.DCPStateIO``), which reshards across layouts. The nxd backend uses NxD's
        own format instead."""
        from ..checkpoint import DCPStateIO

        return DCPStateIO()

    def compile_report(self) -> str | None:
        """One line on ahead-of-time work done so far (torch.compile: graphs from the cache and
        graphs compiled), or None when the backend compiles nothing itself."""
        return None

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params: list[nn.Parameter] = []
        for part in self.model_parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params
