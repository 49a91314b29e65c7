"""The trainer's shared code on torch 2.9, the trn1 image's torch: it imports and works there as
on the main venv's torch (config, layout, data, checkpoints, metrics, protocol, shard maps).
Plain CPU tensors; the device paths are in the other files of this tier."""

from __future__ import annotations

import importlib
import json
import pkgutil
import random
import re
from importlib.metadata import version
from pathlib import Path

import llamajob_trainer
import numpy as np
import pydantic
import pytest
import torch
from llamajob_trainer import metrics, protocol
from llamajob_trainer.checkpoint import CheckpointManager
from llamajob_trainer.data import BatchSource, PackedDataset, check_compatible
from llamajob_trainer.errors import ConfigError
from llamajob_trainer.model import Llama, loss_sum
from llamajob_trainer.parallel import LayoutError, make_layout
from llamajob_trainer.parallel.nxd_shards import ShardPlan
from llamajob_trainer.presets import Architecture
from llamajob_trainer.train import param_groups, to_batch
from prometheus_client import generate_latest
from xla_helpers import SEQ, nxd_config, packed_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_this_tier_runs_the_torch_and_torch_xla_of_the_trn1_image() -> None:
    """The trn1 image is AWS's Neuron DLC whose tag starts with its torch version."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    match = re.search(r"ARG TRN1_BASE_IMAGE=\S+:(\d+\.\d+\.\d+)-neuronx", dockerfile)
    assert match, "the Dockerfile names no trn1 base image"
    assert version("torch") == version("torch-xla") == match.group(1)


def test_every_trainer_module_imports() -> None:
    names = [m.name for m in pkgutil.walk_packages(llamajob_trainer.__path__,
                                                    "llamajob_trainer.")]
    for name in names:
        importlib.import_module(name)
    assert {"llamajob_trainer.train", "llamajob_trainer.parallel.neuron_backend",
            "llamajob_trainer.parallel.torch_backend"} <= set(names)


def test_config_validates_round_trips_and_lays_out(tmp_path: Path) -> None:
    cfg = nxd_config(tmp_path)
    again = type(cfg).model_validate(cfg.to_wire())
    assert again == cfg and again.training_fingerprint() == cfg.training_fingerprint()
    layout = make_layout(cfg, cfg.model.architecture(), 1)
    assert (layout.tp, layout.dp, layout.grad_accum) == (1, 1, 6)
    with pytest.raises(pydantic.ValidationError, match=r"minLr .* must not exceed lr"):
        nxd_config(tmp_path, optimizer={"lr": 1e-4, "minLr": 1e-3})
    with pytest.raises(LayoutError, match="torchCompile"):
        bad = nxd_config(tmp_path, compile={"torchCompile": True})
        make_layout(bad, bad.model.architecture(), 1)


def test_data_parallel_ranks_split_the_global_batch(tmp_path: Path) -> None:
    dataset = PackedDataset(packed_dataset(tmp_path / "data"))
    check_compatible(dataset.metadata, seq_length=SEQ, vocab_size=512, global_batch_size=8,
                     tokenizer_identity=None)
    with pytest.raises(ConfigError, match="seqLength"):
        check_compatible(dataset.metadata, seq_length=SEQ * 2, vocab_size=512,
                         global_batch_size=8, tokenizer_identity=None)

    def rows(dp_rank: int, dp_size: int) -> np.ndarray:
        source = BatchSource(dataset, seed=3, global_batch_size=8, micro_batch_size=2,
                             dp_rank=dp_rank, dp_size=dp_size)
        source.next_micro_batches()  # the second step's batch: the order carries on
        return np.concatenate(source.next_micro_batches())

    whole = rows(0, 1)
    assert whole.shape == (8, SEQ + 1)
    assert np.array_equal(np.concatenate([rows(0, 2), rows(1, 2)]), whole)


def tiny_llama(seed: int) -> tuple[Llama, torch.optim.Optimizer]:
    arch = Architecture(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, vocab_size=259, rope_theta=10000.0,
                        max_position_embeddings=SEQ)
    model = Llama(arch)
    model.init_weights(seed)
    return model, torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)


def test_checkpoints_save_verify_load_and_fall_back(tmp_path: Path) -> None:
    """The checkpoint manager on torch 2.9's distributed checkpoint, in one process: an exact
    round trip of weights, AdamW moments, RNG and data position, and a damaged newest
    checkpoint quarantined in favour of the previous one."""
    dataset = PackedDataset(packed_dataset(tmp_path / "data"))
    x, y = to_batch(dataset.rows(np.arange(4)))
    model, opt = tiny_llama(seed=1)
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, fingerprint="fp", log=lambda _: None)
    manager.prepare()
    saved = {}
    for step in (1, 2):
        (loss_sum(model(x), y) / y.numel()).backward()
        opt.step()
        opt.zero_grad()
        random.seed(step)
        torch.manual_seed(step)
        manager.save(step, [model], [opt], {"data": {"consumed_samples": 4 * step}})
        saved[step] = ({k: v.clone() for k, v in model.state_dict().items()}, torch.rand(2))
    assert manager.verify(2)["step"] == 2

    def restored() -> tuple[dict, Llama, torch.optim.Optimizer]:
        other, other_opt = tiny_llama(seed=9)
        state = manager.restore("latestIfExists", [other], [other_opt])
        assert state is not None
        return state, other, other_opt

    state, other, other_opt = restored()
    weights, draw = saved[2]
    assert state["step"] == 2 and state["data"] == {"consumed_samples": 8}
    assert all(torch.equal(v, weights[k]) for k, v in other.state_dict().items())
    assert torch.equal(torch.rand(2), draw)  # the RNG continues where the save left it
    moments = [s["exp_avg"] for s in other_opt.state.values()]
    assert len(moments) == len(list(other.parameters())) and any(m.abs().sum() > 0
                                                                  for m in moments)

    shard = next((tmp_path / "ckpt" / "step_2" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    state, other, _ = restored()
    assert state["step"] == 1
    assert all(torch.equal(v, saved[1][0][k]) for k, v in other.state_dict().items())
    (quarantined,) = (tmp_path / "ckpt" / "quarantine").iterdir()
    assert quarantined.name.startswith("step_2.")


def test_metrics_and_the_termination_message(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    record = metrics.StepRecord(step=3, max_steps=8, loss=float("nan"), lr=1e-3, grad_norm=0.5,
                                tokens_per_second=100.0, samples_per_second=3.0, mfu=0.0,
                                step_seconds=0.2, consumed_samples=24)
    line = json.loads(record.json_line())
    assert line["loss"] is None and line["loss_non_finite"] == "nan"
    registry, trainer = metrics.build_registry("job", "ns")
    trainer.record_step(record)
    values = metrics.scrape_values(generate_latest(registry).decode())
    assert values[protocol.TRAIN_STEP] == 3 and values[protocol.TRAIN_GRAD_NORM] == 0.5

    log = tmp_path / "termination-log"
    monkeypatch.setenv(protocol.TERMINATION_LOG_ENV, str(log))
    protocol.write_termination_message(reason=protocol.REASON_DIVERGED, step=3)
    assert protocol.parse_termination_message(log.read_text()) == {
        "reason": protocol.REASON_DIVERGED, "step": 3,
    }


def test_shard_maps_rebuild_every_weight_for_trn1_kv_replication() -> None:
    """The pure shard maps on torch 2.9: 8B's head layout (32 q heads over 8 kv heads) at
    tensor degree 32 with kvReplicator 4 on trn1, each weight cut for every rank and put back."""
    arch = Architecture(hidden_size=64, num_layers=1, num_heads=32, num_kv_heads=8,
                        intermediate_size=128, vocab_size=256, rope_theta=5e5,
                        max_position_embeddings=SEQ)
    plan = ShardPlan(arch, tp=32, kv_replicator=4, platform="trn1")
    gen = torch.Generator().manual_seed(0)
    for fqn in plan.fqns():
        full = torch.randn(plan.full_shape(fqn), generator=gen)
        shards = [plan.shard(fqn, full, rank) for rank in range(plan.tp)]
        assert torch.equal(plan.assemble(fqn, shards), full), fqn
    # Rank 1 holds a copy of kv head 1 and the q heads it serves; wo's columns follow them.
    assert plan.kv_heads(1) == [1] and plan.q_heads(1) == [4]
