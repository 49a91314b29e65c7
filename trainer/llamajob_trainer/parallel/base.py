"""What every backend hands to the training loop."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from .layout import Layout


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

    @abstractmethod
    def forward_backward(self, micro_batches: list[tuple[Tensor, Tensor]]) -> float:
        """Forward and backward over one optimizer step's micro-batches (this DP rank's
        ``(input_ids[mbs, seq], labels[mbs, seq])`` pairs), accumulating gradients.

        The loss is the mean token cross-entropy over the global batch, so the gradients equal
        those of one process running the whole batch. Returns that loss, the same on all ranks.
        """

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm across all ranks; scales gradients to ``max_norm`` if it is
        exceeded. ``max_norm <= 0`` only computes the norm."""

    def parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        params: list[nn.Parameter] = []
        for part in self.model_parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params
