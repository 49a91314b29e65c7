"""fp32 linear layers on CPU through oneDNN or the BLAS behind ``torch.mm``, whichever this CPU
runs faster.

Why: ``torch.mm`` on CPU calls the BLAS torch was built with, MKL in the PyPI wheels, while
oneDNN (also inside every x86 wheel) picks its JIT kernels from the CPU's features. Which one
wins depends on the CPU: on an AMD Zen 5 machine oneDNN's fp32 matmul ran at 2.1x MKL's on one
thread (about 210 against 95 GFLOP/s) for every shape of a layer's forward and backward; on an
Intel Xeon (AVX-512) MKL won every shape, by 5-15% and by 2x for the down projection's
backward. So no fixed choice is right: by default (``LLAMAJOB_CPU_MATMUL=auto``) the backend
times the model's own linear shapes on both libraries when it builds the model (``measure``,
well under a second) and takes oneDNN only when it is clearly faster (``decide``).
``LLAMAJOB_CPU_MATMUL=onednn`` or ``aten`` pins the choice.

Both compute in fp32 (oneDNN's default math mode, no bf16 or tf32 down-conversion); the results
differ from ``F.linear``'s by summation order only (about 1e-6 relative). A run keeps one choice
throughout, and checkpoints record it: a resumed run takes the recorded library rather than
timing again, so the bit-identical resume holds. Two fresh runs agree bit for bit only when they
chose the same library; pin it for that.

Only plain fp32 CPU tensors outside autocast take the oneDNN path: DTensor weights (tensor
parallel), bf16 weights (FSDP2 mixed precision), autocast regions and other devices keep
``F.linear``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

ENV_VAR = "LLAMAJOB_CPU_MATMUL"
CHOICES = ("auto", "onednn", "aten")
LIBRARIES = ("onednn", "aten")
LIBRARY_NAMES = {"onednn": "oneDNN", "aten": "torch.mm"}
# oneDNN is taken only when it beats torch.mm by this fraction: the default library wins ties,
# and a margin keeps timing noise from flipping the choice between runs on the same CPU.
MARGIN = 0.10
# Rows of the timed matmuls: at most a micro-batch's tokens and at most this many (the ranking
# at 256-2048 rows was the same on both CPUs above), fewer when the layer is wide, so that one
# timing of one library stays near FLOP_BUDGET.
MAX_ROWS = 512
MIN_ROWS = 64
FLOP_BUDGET = 1e10
# Matrix sides beyond this are timed at this size: the kernels' speed depends on the shape class,
# and a full 4096 x 128256 output projection would cost gigabytes and seconds to time.
MAX_SIDE = 4096


def available() -> bool:
    """oneDNN is built in and exposes the linear kernel Inductor itself uses for CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def requested() -> str:
    """``LLAMAJOB_CPU_MATMUL``: auto (default), onednn or aten; a bad value names the variable."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: use one of {', '.join(CHOICES)}")
    return choice


def pinned() -> str | None:
    """The library when no timing is needed: the one the variable pins, ``aten`` when torch has
    no oneDNN kernel; None under ``auto``."""
    choice = requested()
    if choice == "auto" and available():
        return None
    return "aten" if choice == "auto" else choice


def decide(seconds: dict[str, float]) -> str:
    """The library to use from ``measure``'s timings: oneDNN only when it is faster than
    ``torch.mm`` by more than ``MARGIN``."""
    onednn, aten = seconds.get("onednn"), seconds.get("aten")
    if onednn is None or aten is None:
        return "aten"
    return "onednn" if onednn < aten * (1.0 - MARGIN) else "aten"


def timed_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The (in, out) ``measure`` times for a layer of ``shape``: each side capped at MAX_SIDE."""
    return min(shape[0], MAX_SIDE), min(shape[1], MAX_SIDE)


def timing_rows(shapes: Iterable[tuple[int, int]], rows: int) -> int:
    """How many rows ``measure`` multiplies: the micro-batch's, capped by ``MAX_ROWS`` and by the
    FLOP budget over the distinct (capped) shapes, and at least ``MIN_ROWS``."""
    distinct = {timed_shape(shape) for shape in shapes}
    work = 6 * sum(i * o for i, o in distinct)  # 3 products of 2 x rows x in x out each
    by_budget = int(FLOP_BUDGET // max(work, 1))
    return max(MIN_ROWS, min(rows, MAX_ROWS, by_budget))


def measure(shapes: Iterable[tuple[int, int]], rows: int, repeats: int = 2) -> dict[str, float]:
    """Seconds one forward and backward of every linear in ``shapes`` ((in, out) per layer,
    repeated as often as the model holds it) takes on each library, at ``rows`` input rows: the
    three products of a training step (``x W^T``, ``g W``, ``g^T x``), best of ``repeats``
    after a warm-up, each distinct shape timed once (sides capped, ``timed_shape``) and
    weighted by its count."""
    counts = Counter(timed_shape(shape) for shape in shapes)
    total = dict.fromkeys(LIBRARIES, 0.0)
    gen = torch.Generator().manual_seed(0)  # the global RNG is the run's, left untouched
    for (n_in, n_out), count in sorted(counts.items()):
        x = torch.randn(rows, n_in, generator=gen)
        w = torch.randn(n_out, n_in, generator=gen)
        g = torch.randn(rows, n_out, generator=gen)
        for library in LIBRARIES:
            _step_products(library, x, w, g)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                _step_products(library, x, w, g)
                best = min(best, time.perf_counter() - start)
            total[library] += best * count
    return total


def _step_products(library: str, x: Tensor, w: Tensor, g: Tensor) -> None:
    """The forward product and both backward products of a linear layer on ``library``."""
    if library == "onednn":
        mm_t(x, w), mm_t(g, w.t()), mm_t(g.t(), x.t())
    else:
        F.linear(x, w), g @ w, g.t() @ x


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every ``Linear`` of ``model``."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, Linear)]


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
    """Set every ``Linear`` of ``model`` to the oneDNN path (``on``) or ``F.linear``; returns how
    many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.onednn = on
            count += 1
    return count
