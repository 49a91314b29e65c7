"""fp32 CPU linears on oneDNN: the same numbers as F.linear, forward and backward, eager and
compiled, and only where the operands allow it; what LLAMAJOB_CPU_MATMUL asks for and what the
torch backend sets on every Linear (the timed choice itself: test_cpu_matmul_choice.py)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from llamajob_trainer import cpu_linear
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.model import Llama
from llamajob_trainer.presets import PRESETS
from torch.profiler import profile

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch built without oneDNN")


def kernels_called(fn: object) -> dict[str, int]:
    with profile() as prof:
        fn()  # type: ignore[operator]
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def linear_pair(in_f: int, out_f: int, seed: int = 0) -> tuple[cpu_linear.Linear, torch.nn.Linear]:
    torch.manual_seed(seed)
    ours = cpu_linear.Linear(in_f, out_f, bias=False)
    ours.onednn = True
    ref = torch.nn.Linear(in_f, out_f, bias=False)
    ref.weight.data.copy_(ours.weight.data)
    return ours, ref


@pytest.mark.parametrize("shape", [(3, 17, 40), (64, 40), (1, 1, 40)])
def test_matches_f_linear_in_output_and_both_gradients(shape: tuple[int, ...]) -> None:
    ours, ref = linear_pair(40, 24)
    x = torch.randn(*shape, dtype=torch.float64).float()
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert y1.shape == y2.shape == (*shape[:-1], 24)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)


def test_runs_on_onednn_not_on_torch_mm() -> None:
    ours, _ = linear_pair(64, 32)
    x = torch.randn(8, 64, requires_grad=True)

    def step() -> None:
        ours(x).sum().backward()

    on = kernels_called(step)
    # Forward, input gradient, weight gradient.
    assert on.get("mkldnn::_linear_pointwise") == 3
    assert "aten::mm" not in on
    ours.onednn = False
    off = kernels_called(step)
    assert "mkldnn::_linear_pointwise" not in off
    assert off.get("aten::mm", 0) >= 2


def test_strided_gradient_operands_are_handled() -> None:
    """An upstream gradient that is a broadcast (stride 0) or a strided slice is made dense."""
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(7, 5, requires_grad=True)
    cpu_linear.mm_t(a, b).sum().backward()  # gradient of sum(): an expanded tensor
    torch.testing.assert_close(a.grad, torch.ones(6, 7) @ b.detach())
    torch.testing.assert_close(b.grad, torch.ones(6, 7).t() @ a.detach())
    every_other, w = torch.randn(6, 10)[:, ::2], b.detach()
    torch.testing.assert_close(cpu_linear.mm_t(every_other, w), every_other @ w.t())


def test_falls_back_where_onednn_does_not_apply() -> None:
    ours, ref = linear_pair(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_linear.applies(x, ours.weight, ours.bias)
        assert ours(x).dtype == torch.bfloat16
        assert torch.equal(ours(x), ref(x))
    ours.double()
    assert not cpu_linear.applies(x.double(), ours.weight, ours.bias)
    assert torch.equal(ours(x.double()), F.linear(x.double(), ours.weight))
    biased = cpu_linear.Linear(16, 8, bias=True)
    biased.onednn = True
    assert not cpu_linear.applies(x, biased.weight, biased.bias)
    assert torch.equal(biased(x), F.linear(x, biased.weight, biased.bias))


def test_compiled_graph_keeps_the_onednn_op_and_its_gradients() -> None:
    ours, ref = linear_pair(32, 48)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x1 = torch.randn(2, 5, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1 = compiled(x1)
    y2 = ref(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    assert "mkldnn::_linear_pointwise" in kernels_called(lambda: compiled(x1).sum().backward())


def test_llama_on_onednn_computes_the_same_loss_and_gradients() -> None:
    arch = PRESETS["tiny"]
    torch.manual_seed(0)
    model = Llama(arch)
    model.init_weights(seed=3)
    tokens = torch.randint(0, arch.vocab_size, (2, 33))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    assert cpu_linear.use_onednn(model, False) == 7 * arch.num_layers + 1
    ref_loss, ref_grads = loss_and_grads()
    cpu_linear.use_onednn(model, True)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "choice"),
    [(None, "auto"), ("", "auto"), ("auto", "auto"), (" OneDNN ", "onednn"), ("aten", "aten")],
)
def test_environment_variable_requests_a_library_or_auto(
    monkeypatch: pytest.MonkeyPatch, value: str | None, choice: str
) -> None:
    if value is None:
        monkeypatch.delenv(cpu_linear.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(cpu_linear.ENV_VAR, value)
    assert cpu_linear.requested() == choice
    # A pinned library is taken as is; auto is timed (torch has oneDNN, as the module requires).
    assert cpu_linear.pinned() == (None if choice == "auto" else choice)


def test_bad_environment_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.ENV_VAR, "mkl")
    message = re.escape("LLAMAJOB_CPU_MATMUL='mkl': use one of auto, onednn, aten")
    with pytest.raises(ValueError, match=message):
        cpu_linear.requested()
    with pytest.raises(ValueError, match=message):
        cpu_linear.pinned()


def onednn_flags(pm: object) -> set[bool]:
    return {
        m.onednn
        for part in pm.model_parts  # type: ignore[attr-defined]
        for m in part.modules()
        if isinstance(m, cpu_linear.Linear)
    }


@pytest.mark.parametrize("env", ["onednn", "aten", None])
def test_torch_backend_sets_the_path_on_every_linear(
    monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    """fp32 on CPU: the pinned library, or (variable unset: auto) the timed one, on every
    Linear; the model records which and, when timed, rank 0's timings of both."""
    from llamajob_trainer.parallel import init_distributed, parallelize

    if env is None:
        monkeypatch.delenv(cpu_linear.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(cpu_linear.ENV_VAR, env)
    cfg = TrainerConfig.model_validate(
        {"batch": {"micro_batch_size": 1, "global_batch_size": 1}, "precision": "fp32"}
    )
    pm = parallelize(cfg, PRESETS["tiny"], init_distributed())
    linears = [m for part in pm.model_parts for m in part.modules()
               if isinstance(m, cpu_linear.Linear)]
    assert len(linears) == 7 * PRESETS["tiny"].num_layers + 1
    if env == "onednn":
        assert pm.cpu_matmul == "onednn" and pm.cpu_matmul_seconds == {}
        assert onednn_flags(pm) == {True}
    elif env == "aten":
        # Pinned to torch.mm, no Linear takes the oneDNN path (what pm.cpu_matmul records
        # then is tested in test_cpu_matmul_choice.py).
        assert onednn_flags(pm) == {False}
    else:
        assert pm.cpu_matmul in cpu_linear.LIBRARIES
        assert onednn_flags(pm) == {pm.cpu_matmul == "onednn"}
        assert set(pm.cpu_matmul_seconds) == {"onednn", "aten"}
        assert all(s > 0 for s in pm.cpu_matmul_seconds.values())
        assert cpu_linear.decide(pm.cpu_matmul_seconds) == pm.cpu_matmul


@pytest.mark.parametrize("env", ["onednn", None])
def test_bf16_mixed_keeps_f_linear_and_records_no_library(
    monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    from llamajob_trainer.parallel import init_distributed, parallelize

    if env is None:
        monkeypatch.delenv(cpu_linear.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(cpu_linear.ENV_VAR, env)
    cfg = TrainerConfig.model_validate(
        {"batch": {"micro_batch_size": 1, "global_batch_size": 1}, "precision": "bf16-mixed"}
    )
    pm = parallelize(cfg, PRESETS["tiny"], init_distributed())
    assert pm.cpu_matmul is None and pm.cpu_matmul_seconds == {}
    assert onednn_flags(pm) == {False}
