"""The nxd backend's calls into NxD and torch-xla, and the nxd compile marker.

Neither NxD nor torch-xla is installed here, so the backend runs against small stand-ins put in
``sys.modules``: only the names ``parallel/neuron_backend.py`` touches, each recording how it was
called. These tests check the call sites against NxD's and torch-xla's API as read at the
versions the trn1 image pins (aws-neuron/neuronx-distributed v2.28.0, pytorch/xla v2.9.0; the
sources are cited beside each call in the backend): the pipeline is partitioned
(``auto_partition``), the clipping bound reaches the ZeRO-1 optimizer, every micro-batch is its
own graph, the loss and the norm are read in step closures, and the selective recompute is
torch-xla's reentrant checkpoint. They say nothing of how the backend behaves on Trainium.

The compile marker tests run the torch backend for real on the CPU: a failed compile step
leaves no marker, and neither does neuron_parallel_compile's extraction run; the wrapper that
the nxd compile pods run records the marker only after the wrapped command exits 0.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import json
import math
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from llamajob_trainer import compile as compile_step
from llamajob_trainer import model as model_module
from llamajob_trainer import protocol
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.parallel import neuron_backend as nb
from llamajob_trainer.parallel.dist import DistEnv
from llamajob_trainer.parallel.layout import make_layout
from test_nxd_shards import SEVENTY_B, nxd_stand_ins  # noqa: F401  (a fixture)
from torch import Tensor, nn
from trainer_helpers import tiny_config

# --- stand-ins for torch_xla and neuronx_distributed -----------------------------------------


class Recorder:
    """What the backend asked of the stand-ins, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.closures: list[Callable[[], None]] = []
        self.configs: list[dict[str, Any]] = []
        self.optimizers: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.dp_size = 1

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    # importlib.util.find_spec (require_neuron) reads a loaded module's __spec__.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def _install(monkeypatch: pytest.MonkeyPatch, modules: dict[str, types.ModuleType]) -> None:
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name, mod in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, mod)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()

    # torch_xla.core.xla_model: mark_step runs the step closures after the graph is cut, as
    # torch_xla.sync does (torch_xla/torch_xla.py at v2.9.0, lines 78-96).
    def mark_step(wait: bool = False) -> None:
        rec.events.append(("mark_step", None))
        closures, rec.closures = rec.closures, []
        for closure in closures:
            closure()

    def add_step_closure(closure: Callable[..., Any], args: tuple[Any, ...] = ()) -> None:
        rec.events.append(("add_step_closure", None))
        rec.closures.append(lambda: closure(*args))

    def all_reduce(op: str, value: Tensor, groups: Any = None) -> Tensor:
        rec.events.append(("all_reduce", (op, groups)))
        return value * rec.dp_size if op == "sum" else value

    xm = _module(
        "torch_xla.core.xla_model",
        mark_step=mark_step,
        add_step_closure=add_step_closure,
        all_reduce=all_reduce,
        REDUCE_SUM="sum",
        REDUCE_MAX="max",
        xla_device=lambda: torch.device("cpu"),
    )

    # torch_xla.utils.checkpoint.checkpoint(function, *args, use_reentrant=True): the reentrant
    # torch checkpoint stands in for its recompute.
    def xla_checkpoint(function: Callable[..., Any], *args: Any, use_reentrant: bool = True,
                       **kwargs: Any) -> Any:
        rec.checkpoints.append({"function": function, "use_reentrant": use_reentrant, **kwargs})
        if not use_reentrant:
            raise ValueError("XLA currently does not support use_reentrant==False")
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)

    # neuronx_distributed: the config and the wrappers, recorded; initialize_parallel_model
    # returns a plain module (the conversion of the model is not what these tests check).
    def neuronx_distributed_config(**kwargs: Any) -> dict[str, Any]:
        rec.configs.append(kwargs)
        return dict(kwargs)

    def initialize_parallel_model(nxd_config: dict[str, Any], model_fn: Callable[..., Any],
                                  include_buffers: bool, *args: Any) -> nn.Module:
        rec.events.append(("initialize_parallel_model", model_fn))
        return nn.Linear(2, 2)

    def initialize_parallel_optimizer(nxd_config: dict[str, Any], optimizer_cls: type,
                                      params: Any, **defaults: Any) -> Any:
        rec.optimizers.append({"cls": optimizer_cls, **defaults})
        return object()

    parallel_state = _module(
        "neuronx_distributed.parallel_layers.parallel_state",
        get_data_parallel_rank=lambda: 0,
        get_data_parallel_size=lambda: rec.dp_size,
        get_data_parallel_replica_groups=lambda: [list(range(rec.dp_size))],
        get_tensor_model_parallel_rank=lambda: 0,
    )
    _install(monkeypatch, {
        "torch_xla": _module("torch_xla"),
        "torch_xla.core": _module("torch_xla.core"),
        "torch_xla.core.xla_model": xm,
        "torch_xla.utils": _module("torch_xla.utils"),
        "torch_xla.utils.checkpoint": _module("torch_xla.utils.checkpoint",
                                              checkpoint=xla_checkpoint),
        "torch_neuronx": _module("torch_neuronx"),
        "neuronx_distributed": _module(
            "neuronx_distributed",
            neuronx_distributed_config=neuronx_distributed_config,
            initialize_parallel_model=initialize_parallel_model,
            initialize_parallel_optimizer=initialize_parallel_optimizer,
        ),
        "neuronx_distributed.parallel_layers": _module("neuronx_distributed.parallel_layers"),
        "neuronx_distributed.parallel_layers.parallel_state": parallel_state,
    })
    yield rec


def nxd_config(tmp_path: Path, **overrides: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        tiny_config(tmp_path / "data", tmp_path / "ckpt", resolvedBackend="nxd", **overrides)
    )


def cpu_env(world_size: int = 1) -> DistEnv:
    return DistEnv(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"),
                   backend="xla")


# --- parallelize_neuron: what NxD is asked for ---------------------------------------------------


def test_pipeline_layouts_are_partitioned_by_nxd(fake: Recorder, tmp_path: Path) -> None:
    """NxD v2.28.0's Llama pipeline script passes auto_partition (run_llama_nxd.py, line 137):
    NxDPPModel traces and cuts only with it or with pipeline_cuts (pipeline/model.py, lines
    340-372), and raises "Model has not been partitioned yet" on parameters() otherwise."""
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1, "pipeline": 2, "zero1": True})
    nb.parallelize_neuron(cfg, cfg.model.architecture(), cpu_env(world_size=2))
    (kwargs,) = fake.configs
    pipeline = kwargs["pipeline_config"]
    assert pipeline["auto_partition"] is True
    # NxD refuses both at once (pipeline/model.py, lines 340-343).
    assert not pipeline.get("pipeline_cuts")
    assert pipeline["transformer_layer_cls"] is model_module.TransformerBlock
    assert pipeline["input_names"] == ["input_ids", "labels"]
    # The data-parallel reduction is the optimizer wrapper's alone (line 1687).
    assert pipeline["use_optimizer_wrapper"] is True
    assert pipeline["use_zero1_optimizer"] is True
    assert kwargs["pipeline_parallel_size"] == 2


def test_unpipelined_layouts_have_no_pipeline_config(fake: Recorder, tmp_path: Path) -> None:
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1, "pipeline": 1})
    nb.parallelize_neuron(cfg, cfg.model.architecture(), cpu_env())
    assert fake.configs[0]["pipeline_config"] is None


@pytest.mark.parametrize(("grad_clip", "bound"), [(0.5, 0.5), (1.0, 1.0), (0.0, math.inf)])
@pytest.mark.parametrize("zero1", [True, False])
def test_the_clipping_bound_is_grad_clip_with_and_without_zero1(
    fake: Recorder, tmp_path: Path, grad_clip: float, bound: float, zero1: bool
) -> None:
    """NxD clips with optimizer_config["max_grad_norm"] without ZeRO-1 (trainer/optimizer.py
    at v2.28.0, lines 142-143). With ZeRO-1 it builds torch-xla's ZeroRedundancyOptimizer
    without that bound (trainer/trainer.py, lines 250-255 and 296-301), which then clips at its
    default of 1.0 (torch_xla/distributed/zero_redundancy_optimizer.py at v2.9.0, line 103)
    unless max_norm is among the keyword arguments NxD passes on."""
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1, "zero1": zero1},
                     optimizer={"gradClip": grad_clip})
    pm = nb.parallelize_neuron(cfg, cfg.model.architecture(), cpu_env())
    optimizer_config = fake.configs[0]["optimizer_config"]
    assert optimizer_config == {"zero_one_enabled": zero1, "grad_clipping": True,
                                "max_grad_norm": bound}
    pm.make_optimizer(torch.optim.AdamW, [], lr=1e-3, betas=(0.9, 0.95))
    (call,) = fake.optimizers
    assert call["cls"] is torch.optim.AdamW and call["lr"] == 1e-3
    if zero1:
        assert call["max_norm"] == bound
    else:
        # AdamW itself would refuse the argument: NxD calls optimizer_class(params, **defaults).
        assert "max_norm" not in call


def test_full_recompute_is_left_to_nxd_per_transformer_block(
    fake: Recorder, tmp_path: Path
) -> None:
    """NxD wraps each TransformerBlock (of each local stage under a pipeline) in its checkpoint
    wrapper, which uses torch-xla's reentrant checkpoint (utils/activation_checkpoint.py at
    v2.28.0, lines 37-46); the model's own block flag stays off."""
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1, "activationCheckpointing": "full"})
    nb.parallelize_neuron(cfg, cfg.model.architecture(), cpu_env())
    assert fake.configs[0]["activation_checkpoint_config"] is model_module.TransformerBlock


# --- selective recompute on XLA ----------------------------------------------------------------


class _NoConversion:
    """Stands in for the backend's layer conversion, which these tests do not exercise."""

    def __init__(self, *args: Any) -> None:
        pass

    def apply(self, model: nn.Module) -> None:
        pass


@pytest.mark.parametrize("mode", ["selective", "full", "none"])
def test_build_model_swaps_in_the_xla_recompute_for_selective(
    fake: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(nb, "_Converter", _NoConversion)
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1, "activationCheckpointing": mode})
    arch = cfg.model.architecture()
    model = nb._build_model(arch, make_layout(cfg, arch, 1), cfg.seed, 1)
    default = model_module.checkpoint_non_reentrant
    for block in model.layers.values():
        assert block.recompute is False  # NxD's wrapper does whole blocks
        assert block.attention.recompute_core is (mode == "selective")
        assert block.attention.recompute_fn is (nb.xla_recompute if mode == "selective"
                                                 else default)


def _attention(arch: Any) -> nn.Module:
    torch.manual_seed(0)
    att = model_module.Attention(arch)
    return att


def _grads(att: nn.Module, x: Tensor, arch: Any) -> list[Tensor]:
    cos, sin = model_module.rope_tables(arch.head_dim, x.shape[1], arch.rope_theta)
    att.zero_grad()
    att(x, cos, sin).square().sum().backward()
    return [p.grad.clone() for p in att.parameters()]


def test_selective_recompute_on_xla_is_torch_xlas_reentrant_checkpoint(
    fake: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's non-reentrant checkpoint never runs on the XLA path; torch-xla's runs with
    use_reentrant=True (torch-xla refuses False: torch_xla/utils/checkpoint.py at v2.9.0, lines
    301-304) and the gradients are those without recompute."""
    arch = nxd_config(tmp_path).model.architecture()
    x = torch.randn(2, 8, arch.hidden_size, requires_grad=True)
    reference = _grads(_attention(arch), x, arch)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.utils.checkpoint called on the XLA path")

    monkeypatch.setattr(model_module, "checkpoint", refuse)
    att = _attention(arch)
    att.recompute_core, att.recompute_fn = True, nb.xla_recompute
    got = _grads(att, x, arch)
    assert [c["use_reentrant"] for c in fake.checkpoints] == [True]
    assert fake.checkpoints[0]["function"] is model_module._attention_core
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_the_torch_backend_keeps_torchs_non_reentrant_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[dict[str, Any]] = []
    real = model_module.checkpoint

    def spy(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", spy)
    arch = nxd_config(tmp_path).model.architecture()
    att = _attention(arch)
    att.recompute_core = True
    _grads(att, torch.randn(2, 8, arch.hidden_size), arch)
    assert calls == [{"use_reentrant": False}]


# --- graphs and step closures ------------------------------------------------------------------


class _TinyLM(nn.Module):
    """(input_ids, labels) -> (mean loss,), as NeuronLlama; counts its forward passes."""

    def __init__(self, fake: Recorder) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fake = fake
        self.emb = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 16)

    def forward(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor]:
        self.fake.events.append(("forward", None))
        logits = self.out(self.emb(input_ids))
        return (nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()),)


def _pm(fake: Recorder, tmp_path: Path, model: nn.Module) -> nb.NeuronParallelModel:
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1})
    arch = cfg.model.architecture()
    layout = make_layout(cfg, arch, 1)
    config = {"optimizer_config": {"zero_one_enabled": True, "max_grad_norm": 1.0}}
    return nb.NeuronParallelModel(layout, cpu_env(), config, model)


def _micro_batches(n: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 16, (2, 5), generator=gen) for _ in range(n)]
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def test_every_micro_batch_is_its_own_graph_and_the_loss_is_read_with_the_optimizer_step(
    fake: Recorder, tmp_path: Path
) -> None:
    """One mark_step per micro-batch, as NxD's loader gives its TP/ZeRO-1 script
    (tp_zero1_llama_hf_pretrain.py at v2.28.0, lines 427-430), the last one cutting the loss
    reduction too. The loss is read by a step closure at the optimizer step's cut, beside the
    norm (lines 331-336): one host wait per step, not one per graph."""

    class Wrapper:
        grad_norm = torch.tensor(2.5)

        def step(self) -> None:
            fake.events.append(("step", None))

    model = _TinyLM(fake)
    pm = _pm(fake, tmp_path, model)
    batches = _micro_batches(4)
    loss = pm.forward_backward(batches)
    names = fake.names()
    assert names.count("mark_step") == 4
    # A cut after each micro-batch: forward, mark_step, forward, mark_step, ...
    assert [n for n in names if n in ("forward", "mark_step")] == ["forward", "mark_step"] * 4
    # The reduction belongs to the last cut; nothing is read yet.
    assert names[-2:] == ["all_reduce", "mark_step"]
    assert "add_step_closure" not in names
    assert not isinstance(loss, float)
    fake.events.clear()
    norm = pm.optimizer_step(Wrapper(), 1.0)  # type: ignore[arg-type]
    assert fake.names() == ["step", "add_step_closure", "add_step_closure", "mark_step"]
    assert norm == 2.5
    with torch.no_grad():
        expected = sum(float(model(x, y)[0]) for x, y in batches) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_a_loss_nobody_read_is_read_on_float(fake: Recorder, tmp_path: Path) -> None:
    """float() of a loss whose step never reached the optimizer (the compile step's validation
    pass) cuts and reads it itself."""
    pm = _pm(fake, tmp_path, _TinyLM(fake))
    loss = pm.forward_backward(_micro_batches(2))
    fake.events.clear()
    value = float(loss)
    assert fake.names() == ["add_step_closure", "mark_step"]
    assert value == float(loss) and value > 0  # read once


def test_the_optimizer_step_is_its_own_graph_and_its_norm_is_read_in_a_closure(
    fake: Recorder, tmp_path: Path
) -> None:
    """NxD's Llama pipeline script cuts after optimizer.step() (run_llama_nxd.py at v2.28.0,
    lines 292-311) and reads the norm in a step closure (lines 295-308)."""

    class Wrapper:
        grad_norm = torch.tensor(2.5)

        def step(self) -> None:
            fake.events.append(("step", None))

    pm = _pm(fake, tmp_path, _TinyLM(fake))
    norm = pm.optimizer_step(Wrapper(), 1.0)  # type: ignore[arg-type]
    assert fake.names() == ["step", "add_step_closure", "mark_step"]
    assert norm == 2.5 and isinstance(norm, float)


def test_evaluate_cuts_per_micro_batch_too(fake: Recorder, tmp_path: Path) -> None:
    pm = _pm(fake, tmp_path, _TinyLM(fake))
    loss_sum, tokens = pm.evaluate(_micro_batches(3))
    assert fake.names().count("mark_step") == 3
    assert tokens == 3 * 2 * 4 and math.isfinite(loss_sum)


# --- the compile marker -------------------------------------------------------------------------


def torch_config(tmp_path: Path) -> TrainerConfig:
    return TrainerConfig.model_validate(
        tiny_config(tmp_path / "data", tmp_path / "ckpt", device="cpu",
                    batch={"microBatchSize": 2, "globalBatchSize": 2})
    )


def _run_compile(cfg: TrainerConfig, fail: bool = False) -> dict[str, Any]:
    """run_compile on the torch backend on this CPU; ``fail``: the step's loss is NaN."""
    from llamajob_trainer import parallel

    real = parallel.parallelize

    def parallelize(*args: Any) -> Any:
        pm = real(*args)
        if fail:
            pm.forward_backward = lambda batches: float("nan")
        return pm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parallel, "parallelize", parallelize)
        try:
            return compile_step.run_compile(cfg, log=lambda line: None)
        finally:
            parallel.shutdown_distributed()


def test_a_failed_compile_leaves_no_marker(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compile_step.EXTRACT_GRAPHS_ENV, raising=False)
    cfg = torch_config(tmp_path)
    _, marker = compile_step.compile_key_and_marker(cfg)
    with pytest.raises(RuntimeError, match="non-finite loss"):
        _run_compile(cfg, fail=True)
    assert not marker.exists()
    fields = _run_compile(cfg)
    assert fields["reason"] == "Compiled" and marker.is_file()
    assert _run_compile(cfg)["compileCached"] is True


def test_graph_extraction_writes_no_marker(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Under neuron_parallel_compile the run only extracts graphs; they are compiled after it."""
    monkeypatch.setenv(compile_step.EXTRACT_GRAPHS_ENV, "1")
    cfg = torch_config(tmp_path)
    _, marker = compile_step.compile_key_and_marker(cfg)
    fields = _run_compile(cfg)
    assert fields["reason"] == "GraphsExtracted" and fields["compileCached"] is False
    assert not marker.exists()


def _wrapped(code: int, report: dict[str, Any] | None) -> list[str]:
    """A stand-in for `neuron_parallel_compile torchrun ... compile`: writes the compile step's
    report (as the step's local rank 0 does) and exits with ``code``."""
    script = "import os, sys, json\n"
    if report is not None:
        script += (f"open(os.environ[{protocol.TERMINATION_LOG_ENV!r}], 'w')"
                   f".write({json.dumps(report)!r})\n")
    script += f"sys.exit({code})\n"
    return [sys.executable, "-c", script]


@pytest.fixture
def wrapper_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    cfg = nxd_config(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_wire()))
    log = tmp_path / "termination-log"
    monkeypatch.setenv(protocol.TERMINATION_LOG_ENV, str(log))
    return path, log


def test_the_wrapper_records_nothing_when_neuron_parallel_compile_fails(
    tmp_path: Path, wrapper_env: tuple[Path, Path]
) -> None:
    config, log = wrapper_env
    cfg = nxd_config(tmp_path)
    key, marker = compile_step.compile_key_and_marker(cfg)
    extracted = {"compileKey": key, "reason": "GraphsExtracted", "compileCached": False}
    argv = ["--node", "0", "--nodes", "1", "--config", str(config), "--"]
    assert compile_step.main([*argv, *_wrapped(3, extracted)]) == 3
    # Exit 0 without the step's report of success (each container's log starts empty):
    # nothing recorded either.
    log.unlink()
    assert compile_step.main([*argv, *_wrapped(0, None)]) == 1
    assert not marker.exists() and not compile_step.nodes_dir(marker).exists()


def test_the_marker_waits_for_every_node(
    tmp_path: Path, wrapper_env: tuple[Path, Path]
) -> None:
    """Each node compiles the graphs its ranks extracted: the marker needs all of them."""
    config, log = wrapper_env
    cfg = nxd_config(tmp_path)
    key, marker = compile_step.compile_key_and_marker(cfg)
    extracted = {"compileKey": key, "reason": "GraphsExtracted", "compileCached": False}
    for node in (1, 0):
        code = compile_step.main(["--node", str(node), "--nodes", "2", "--config", str(config),
                                  "--", *_wrapped(0, extracted)])
        assert code == 0
        report = json.loads(log.read_text())
        assert report["reason"] == "Compiled" and report["compileKey"] == key
        assert marker.is_file() == (node == 0)
    assert json.loads(marker.read_text())["compiledBy"] == "neuron_parallel_compile"
    # The next compile of the key is skipped by the extraction run, and the wrapper agrees.
    cached = {"compileKey": key, "reason": "CompileCached", "compileCached": True}
    assert compile_step.main(["--node", "0", "--nodes", "2", "--config", str(config), "--",
                              *_wrapped(0, cached)]) == 0
    assert json.loads(log.read_text())["compileCached"] is True


def test_the_wrapper_refuses_a_command_line_without_its_node(
    wrapper_env: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = wrapper_env
    for argv in (["--config", str(config), "--", "true"],
                 ["--node", "2", "--nodes", "2", "--", "true"],
                 ["--node", "0", "--nodes", "1"]):
        assert compile_step.main(argv) == 2
    assert "usage" in capsys.readouterr().err


# --- pipeline: meta-device build, only this rank's stage materialised ----------------------------


def test_pipeline_layouts_build_on_meta_and_materialise_through_param_init_fn(
    fake: Recorder, tmp_path: Path
) -> None:
    """NxD's 70B pipeline run (run_llama2_70B_tp_pp.sh at v2.28.0, line 131) initialises on the
    meta device: model_init_config with meta_device_init and param_init_fn (run_llama_nxd.py,
    lines 113-117), which initialize_parallel_model hands to NxDPPModel (trainer/trainer.py,
    lines 172-175)."""
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1, "pipeline": 2})
    nb.parallelize_neuron(cfg, cfg.model.architecture(), cpu_env(world_size=2))
    (kwargs,) = fake.configs
    init = kwargs["model_init_config"]
    assert init["meta_device_init"] is True
    assert isinstance(init["param_init_fn"], nb._StageInit)
    assert init["sequential_move_factor"] == 11


def test_unpipelined_layouts_keep_the_eager_build(fake: Recorder, tmp_path: Path) -> None:
    cfg = nxd_config(tmp_path, parallelism={"tensor": 1, "pipeline": 1})
    nb.parallelize_neuron(cfg, cfg.model.architecture(), cpu_env())
    assert fake.configs[0]["model_init_config"] is None


def _nxd_reinit(stage: nn.Module, param_init_fn: Callable[[nn.Module, torch.device], None]) -> None:
    """NxD's reinit_model on one stage (utils/model_utils.py at v2.28.0, lines 205-229): each
    module's own parameters become empty host tensors, then param_init_fn fills them."""
    with torch.no_grad():
        for module in stage.modules():
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = nn.Parameter(
                        torch.empty_like(param, device="cpu"), param.requires_grad
                    )
            param_init_fn(module, torch.device("cpu"))


@pytest.mark.parametrize(("tp", "kv_rep", "tie"), [(8, 1, False), (32, 4, False), (32, 4, True)])
def test_only_the_stages_layers_are_materialised_with_the_eager_values(
    nxd_stand_ins: Callable[[int, str], None],  # noqa: F811  (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
    tp: int,
    kv_rep: int,
    tie: bool,
) -> None:
    """Stage 1 of 2 (layer 1, the final norm and the output): its parameters get exactly the
    values the eager build gives them; layer 0 and the embedding stay on the meta device and
    their initial values are never computed."""
    from llamajob_trainer.parallel.layout import Layout

    rank, seed = 1, 7
    nxd_stand_ins(tp, "trn2")
    arch = dataclasses.replace(SEVENTY_B, num_layers=2, tie_embeddings=tie)
    layout = Layout(
        world_size=tp * 2, pp=2, dp=1, tp=tp, virtual_pipeline=1, schedule="1F1B", fsdp=False,
        sequence_parallel=True, activation_checkpointing="none", bf16=False,
        torch_compile=False, micro_batch_size=1, grad_accum=1, seq_length=8,
    )  # fmt: skip

    eager = nb.NeuronLlama(arch, max_seq_len=8).to("meta")
    nb._Converter(arch, layout, seed, kv_rep, rank).apply(eager)

    computed: list[str] = []

    def counting_init_tensor(arch: Any, seed: int, fqn: str, shape: Any) -> Tensor:
        computed.append(fqn)
        return model_module.init_tensor(arch, seed, fqn, shape)

    monkeypatch.setattr(nb, "init_tensor", counting_init_tensor)
    # NxD builds under init_on_device(meta) (trainer/trainer.py at v2.28.0, line 165): the
    # stand-in layers' torch.empty lands on meta too.
    stage_init = nb._StageInit()
    with torch.device("meta"):
        deferred = nb.NeuronLlama(arch, max_seq_len=8)
        converter = nb._Converter(arch, layout, seed, kv_rep, rank, deferred=True)
        converter.apply(deferred)
    stage_init.converter = converter
    assert computed == []
    assert all(p.is_meta for p in deferred.parameters())

    stage = nn.ModuleDict(
        {"layer": deferred.layers["1"], "norm": deferred.norm, "output": deferred.output}
    )
    _nxd_reinit(stage, stage_init)
    # The tied output's rows are the embedding's: its value is computed, on the last stage.
    outside = [f for f in computed if f.startswith(("layers.0.", "tok_embeddings."))]
    assert computed and outside == (["tok_embeddings.weight"] if tie else [])
    assert all(p.is_meta for p in deferred.layers["0"].parameters())
    assert deferred.tok_embeddings.weight.is_meta
    mine = dict(stage.named_parameters())
    reference = {"layer." + n: p for n, p in eager.layers["1"].named_parameters()} | {
        "norm.weight": eager.norm.weight,
        "output.weight": eager.output.weight,
    }
    assert mine.keys() == reference.keys()
    for name, value in mine.items():
        assert not value.is_meta
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
