"""Parallel layouts of the torch backend give the single-process numbers.

Each layout runs as real processes (torchrun, gloo on CPU) through `_layout_worker.py`: a few
AdamW steps of a tiny Llama on fixed synthetic data. In fp32 the per-step loss, the global
gradient norm and a forward-only validation pass afterwards must equal a single process's; the
gradient norm is what catches a wrongly scaled or missing reduction (AdamW itself is nearly
scale-invariant). bf16-mixed runs must learn.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from llamajob_trainer import protocol
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.parallel import LayoutError, make_layout
from llamajob_trainer.parallel.layout import stage_layer_range
from llamajob_trainer.presets import PRESETS

WORKER = Path(__file__).with_name("_layout_worker.py")
TIED = {
    "hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 160, "vocab_size": 256, "rope_theta": 500000.0,
    "max_position_embeddings": 256, "tie_embeddings": True,
}
FP32 = {"steps": 3, "micro_batch_size": 1, "global_batch_size": 8, "seq_length": 32}


def run_worker(tmp: Path, spec: dict[str, Any], nproc: int | None, timeout: float = 150) -> dict:
    out = tmp / "result.json"
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(
        [*launcher, str(WORKER), json.dumps(spec), str(out)],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Single-process fp32 runs, untied (tiny preset) and tied."""
    return {
        "tiny": run_worker(tmp_path_factory.mktemp("ref"), FP32, None),
        "tied": run_worker(tmp_path_factory.mktemp("ref_tied"), {**FP32, "arch": TIED}, None),
    }


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the compiled layouts: a block graph one layout compiled is loaded,
    not compiled again, by the next (the cold-cache path has its own test in
    test_train_resume.py)."""
    return tmp_path_factory.mktemp("compile-cache")


LAYOUTS = [
    # id, processes, parallelism, reference model
    ("ddp-full-recompute", 2, {"activation_checkpointing": "full"}, "tiny"),
    ("fsdp2", 2, {"fsdp": True}, "tiny"),
    ("tp-sp", 2, {"tensor": 2}, "tiny"),
    ("pp-1f1b", 2, {"pipeline": 2}, "tiny"),
    ("pp-gpipe-tied", 2, {"pipeline": 2, "pipeline_schedule": "GPipe"}, "tied"),
    ("pp-interleaved", 2, {"pipeline": 2, "virtual_pipeline": 2}, "tiny"),
    ("fsdp-x-tp", 4, {"fsdp": True, "tensor": 2}, "tiny"),
    ("dp-x-tp-no-sp", 4, {"tensor": 2, "sequence_parallel": False}, "tiny"),
    ("pp-x-fsdp", 4, {"pipeline": 2, "fsdp": True}, "tiny"),
    ("pp-x-tp", 4, {"pipeline": 2, "tensor": 2}, "tiny"),
    ("tp-sp-tied", 2, {"tensor": 2}, "tied"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "parallelism", "model"),
    [case[1:] for case in LAYOUTS],
    ids=[case[0] for case in LAYOUTS],
)
def test_layout_matches_single_process(
    tmp_path: Path, reference: dict[str, dict], nproc: int, parallelism: dict, model: str
) -> None:
    spec = {**FP32, "parallelism": parallelism}
    if model == "tied":
        spec["arch"] = TIED
    result = run_worker(tmp_path, spec, nproc)
    layout = result["layout"]
    assert layout["world_size"] == nproc
    assert layout["pp"] * layout["dp"] * layout["tp"] == nproc
    expected = reference[model]
    # Loss parallel: a rank holds only its vocabulary shard of the logits.
    assert result["logits_width"] == expected["logits_width"] // layout["tp"]
    assert result["losses"] == pytest.approx(expected["losses"], rel=1e-4)
    assert result["grad_norms"] == pytest.approx(expected["grad_norms"], rel=1e-4)
    assert result["losses"][-1] < result["losses"][0]
    # Forward-only validation of the trained model: the same sum over the same tokens.
    assert result["eval_tokens"] == expected["eval_tokens"] == 8 * 32
    assert result["eval_loss_sum"] == pytest.approx(expected["eval_loss_sum"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "parallelism"),
    [(2, {"activation_checkpointing": "full"}), (2, {"fsdp": True}), (2, {"pipeline": 2})],
    ids=["ddp-full-recompute", "fsdp2", "pp-1f1b"],
)
def test_torch_compile_matches_single_process(
    tmp_path: Path, reference: dict[str, dict], nproc: int, parallelism: dict,
    inductor_cache: Path,
) -> None:
    """Blocks compiled by Inductor compute the eager model's numbers (fusion reorders float
    operations, so equal to rounding), with recompute, FSDP2 and pipeline stages."""
    spec = {**FP32, "parallelism": parallelism, "torch_compile": True,
            "compile_cache_dir": str(inductor_cache)}
    result = run_worker(tmp_path, spec, nproc, timeout=300)
    assert result["layout"]["torch_compile"] is True
    assert result["losses"] == pytest.approx(reference["tiny"]["losses"], rel=1e-4)
    assert result["grad_norms"] == pytest.approx(reference["tiny"]["grad_norms"], rel=1e-4)


BF16 = {"steps": 6, "micro_batch_size": 1, "global_batch_size": 8, "seq_length": 32, "lr": 2e-3}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "parallelism"),
    [(2, {"fsdp": True}), (4, {"pipeline": 2})],
    ids=["fsdp2-mixed-precision-policy", "pp-x-ddp-autocast"],
)
def test_bf16_mixed_learns(
    tmp_path: Path, reference: dict[str, dict], nproc: int, parallelism: dict
) -> None:
    result = run_worker(tmp_path, {**BF16, "precision": "bf16-mixed", "parallelism": parallelism},
                        nproc)
    losses = result["losses"]
    assert result["layout"]["bf16"] is True
    # Same model and data as the fp32 reference at step 0, within bf16 rounding.
    assert losses[0] == pytest.approx(reference["tiny"]["losses"][0], abs=0.05)
    assert min(losses[-2:]) < losses[0] - 0.5, losses


# --- layout rules (pure) ------------------------------------------------------------------------
def config(**parallelism: Any) -> TrainerConfig:
    batch = parallelism.pop("batch", {"micro_batch_size": 1, "global_batch_size": 8})
    seq = parallelism.pop("seq", 32)
    return TrainerConfig.model_validate(
        {"parallelism": parallelism, "batch": batch, "data": {"seq_length": seq}}
    )


def test_layout_degrees_and_coordinates() -> None:
    layout = make_layout(config(tensor=2, pipeline=2), PRESETS["tiny"], 8)
    assert (layout.pp, layout.dp, layout.tp, layout.grad_accum) == (2, 2, 2, 4)
    assert layout.sequence_parallel
    assert layout.coords(0) == (0, 0, 0)
    assert layout.coords(3) == (0, 1, 1)
    assert layout.coords(6) == (1, 1, 0)
    interleaved = make_layout(config(pipeline=2, virtual_pipeline=2), PRESETS["tiny"], 2)
    assert interleaved.schedule == "Interleaved1F1B"
    assert interleaved.stage_ids(1) == [1, 3]
    assert not make_layout(config(sequence_parallel=True), PRESETS["tiny"], 1).sequence_parallel


@pytest.mark.parametrize(
    ("cfg", "world", "message"),
    [
        (config(tensor=3), 6, "parallelism.tensor \\(3\\) must divide model.numHeads"),
        (config(tensor=4), 4, "does not replicate kv heads"),
        (config(tensor=2), 3, "not a multiple of parallelism.tensor"),
        (config(batch={"micro_batch_size": 3, "global_batch_size": 8}), 1, "globalBatchSize"),
        (config(tensor=2, seq=33), 2, "seqLength \\(33\\) must be a multiple"),
        (config(pipeline=8), 8, "need at least as many layers"),
        (config(pipeline=2, batch={"micro_batch_size": 4, "global_batch_size": 4}), 2,
         "1F1B schedule needs at least"),
    ],
)
def test_layout_errors_name_the_field(cfg: TrainerConfig, world: int, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        make_layout(cfg, PRESETS["tiny"], world)


@pytest.mark.parametrize(
    ("backend", "tensor", "message"),
    [
        ("nxd", 1, "applies to the torch backend"),
        ("torch", 2, "does not combine with parallelism.tensor \\(2\\)"),
    ],
)
def test_torch_compile_layouts_the_backend_cannot_run(
    backend: str, tensor: int, message: str
) -> None:
    cfg = TrainerConfig.model_validate(
        {
            "parallelism": {"tensor": tensor},
            "batch": {"micro_batch_size": 1, "global_batch_size": 8},
            "data": {"seq_length": 32},
            "compile": {"torch_compile": True},
            "resolved_backend": backend,
        }
    )
    with pytest.raises(LayoutError, match=message):
        make_layout(cfg, PRESETS["tiny"], 2)


def test_neuron_layout_accepts_kv_replication() -> None:
    arch = PRESETS["llama3-70b"]  # 8 kv heads, tensor 32
    cfg = config(tensor=32, pipeline=1, kv_replicator=4)
    cfg.resolved_backend = "nxd"
    assert make_layout(cfg, arch, 32).tp == 32
    cfg.parallelism.kv_replicator = 2
    with pytest.raises(LayoutError, match="raise kvReplicator to 4"):
        make_layout(cfg, arch, 32)


@pytest.mark.parametrize(("layers", "stages"), [(4, 2), (5, 2), (7, 4), (80, 8)])
def test_stage_split_covers_every_layer_once(layers: int, stages: int) -> None:
    ranges = [stage_layer_range(layers, stages, s) for s in range(stages)]
    assert [i for r in ranges for i in r] == list(range(layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


# --- the nxd backend without its packages ------------------------------------------------------
@pytest.fixture
def no_neuron_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the Neuron packages even where they happen to be installed."""
    from llamajob_trainer.parallel import neuron_backend

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in neuron_backend.NEURON_MODULES else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_neuron_backend_without_packages_is_a_dependency_error(no_neuron_packages: None) -> None:
    from llamajob_trainer.parallel import init_distributed, parallelize
    from llamajob_trainer.parallel.neuron_backend import NeuronUnavailable

    cfg = config()
    cfg.resolved_backend = "nxd"
    with pytest.raises(NeuronUnavailable) as info:
        parallelize(cfg, PRESETS["tiny"], None)  # type: ignore[arg-type]
    assert info.value.exit_code == protocol.EXIT_DEPENDENCY
    message = str(info.value)
    assert "torch_xla" in message and "neuronx_distributed" in message
    assert "neuron` extra" in message and "backend: torch" in message
    with pytest.raises(NeuronUnavailable):
        init_distributed("nxd")


@pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is not None, reason="Neuron packages are installed"
)
def test_trainer_cli_exits_with_dependency_code_for_neuron(tmp_path: Path) -> None:
    """Through the real CLI: the exit code and termination message the operator reads."""
    from trainer_helpers import prepare_pydoc, run_trainer, tiny_config, write_config

    data = prepare_pydoc(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "ckpt", resolvedBackend="nxd", backend="nxd")
    result = run_trainer("train", write_config(tmp_path / "job.yaml", cfg), tmp_path, None,
                         timeout=120)
    assert result.returncode == protocol.EXIT_DEPENDENCY, result.stderr[-3000:]
    assert "neuron` extra" in result.stderr
    assert "Traceback" not in result.stderr
    message = json.loads((tmp_path / "termination.json").read_text())
    assert message["permanent"] is True


def test_torch_backend_builds_the_fused_adamw_unless_told_otherwise() -> None:
    """torch's AdamW default on CPU loops over parameters in Python; the backend asks for the
    fused kernel, and an explicit choice of implementation is left alone."""
    import torch
    from llamajob_trainer.parallel import init_distributed, parallelize, shutdown_distributed
    from torch.distributed.tensor import DTensor, Replicate

    pm = parallelize(config(), PRESETS["tiny"], init_distributed())
    try:
        fused = pm.make_optimizer(torch.optim.AdamW, pm.parameters(), lr=1e-3)
        assert fused.param_groups[0]["fused"] is True
        loop = pm.make_optimizer(torch.optim.AdamW, pm.parameters(), lr=1e-3, foreach=False)
        assert not loop.param_groups[0]["fused"]
        sgd = pm.make_optimizer(torch.optim.SGD, pm.parameters(), lr=1e-3)
        assert not sgd.param_groups[0]["fused"]
        # Tensor parallel without FSDP: DTensor projections beside plain norm gains.
        sharded = torch.nn.Parameter(
            DTensor.from_local(torch.zeros(2, 2), pm.mesh["tp"], [Replicate()])
        )
        groups = [{"params": [sharded]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}]
        mixed = pm.make_optimizer(torch.optim.AdamW, groups, lr=1e-3)
        assert not any(g["fused"] for g in mixed.param_groups)
    finally:
        shutdown_distributed()
