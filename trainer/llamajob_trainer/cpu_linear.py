"""fp32 linear layers on CPU through oneDNN rather than the BLAS behind ``torch.mm``.

Why: ``torch.mm`` on CPU calls the BLAS torch was built with, MKL in the PyPI wheels, while
oneDNN (also inside every x86 wheel) picks its JIT kernels from the CPU's features. On the AMD
Zen 5 machine the benchmark ran on, oneDNN's fp32 matmul ran at 2.1x MKL's on one thread (about
210 against 95 GFLOP/s) for every shape of a layer's forward and backward; MKL is known to take
slower paths on non-Intel CPUs. Not measured on Intel CPUs, where the two may be close;
``benchmarks/trainer_throughput.py`` prints both peaks, and ``LLAMAJOB_CPU_MATMUL=aten`` turns
this path off.

Both compute in fp32 (oneDNN's default math mode, no bf16 or tf32 down-conversion); the results
differ from ``F.linear``'s by summation order only (about 1e-6 relative). A run uses one choice
throughout (the environment variable, not a timing), so the bit-identical resume holds.

Only plain fp32 CPU tensors outside autocast take this path: DTensor weights (tensor parallel),
bf16 weights (FSDP2 mixed precision), autocast regions and other devices keep ``F.linear``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

ENV_VAR = "LLAMAJOB_CPU_MATMUL"
CHOICES = ("onednn", "aten")


def available() -> bool:
    """oneDNN is built in and exposes the linear kernel Inductor itself uses for CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def wanted(device: torch.device) -> bool:
    """Whether fp32 linears on ``device`` should run on oneDNN in this process."""
    choice = os.environ.get(ENV_VAR, "onednn").strip().lower() or "onednn"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: use one of {', '.join(CHOICES)}")
    return device.type == "cpu" and choice == "onednn" and available()


def _row_or_column_major(t: Tensor) -> Tensor:
    # oneDNN takes a 2-D operand in either order (a transposed view costs no copy); anything
    # else (a broadcast, a strided slice) is made dense first.
    if t.stride(-1) == 1 or t.stride(0) == 1:
        return t
    return t.contiguous()


@torch.library.custom_op("llamajob::onednn_mm_t", mutates_args=())
def mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for 2-D fp32 CPU tensors on oneDNN, with its own backward (also oneDNN).

    A registered op rather than a plain call so that autograd and torch.compile see one opaque
    kernel with a known output shape.
    """
    return torch.ops.mkldnn._linear_pointwise(
        _row_or_column_major(a), _row_or_column_major(b), None, "none", [], ""
    )


@mm_t.register_fake
def _mm_t_shape(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


def _save_operands(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _mm_t_backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    a, b = ctx.saved_tensors  # type: ignore[attr-defined]
    needs_a, needs_b = ctx.needs_input_grad  # type: ignore[attr-defined]
    grad_a = mm_t(grad, b.t()) if needs_a else None  # grad @ b
    grad_b = mm_t(grad.t(), a.t()) if needs_b else None  # grad.T @ a
    return grad_a, grad_b


mm_t.register_autograd(_mm_t_backward, setup_context=_save_operands)


def applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        bias is None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not isinstance(weight, DTensor)
        and not isinstance(x, DTensor)
        and not torch.is_autocast_enabled("cpu")
    )


class Linear(nn.Linear):
    """``nn.Linear`` (same parameter, same FQN, what tensor parallel's plans expect) whose
    matmul runs on oneDNN when ``onednn`` is set (by the parallel backend) and the operands
    allow it."""

    onednn: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.onednn and applies(x, self.weight, self.bias):
            out = mm_t(x.reshape(-1, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight, self.bias)


def use_onednn(model: nn.Module, on: bool) -> int:
    """Set every ``Linear`` of ``model`` to the oneDNN path or back; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.onednn = on
            count += 1
    return count
