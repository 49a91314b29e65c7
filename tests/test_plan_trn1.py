"""The planner's trn1 (NxD) model: what the backend holds per parameter, the layouts the Neuron
runtime refuses, the kv-replication rules, and step times against AWS's published runs."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ROOT
from llamajob.api import LlamaTrainingJobSpec
from llamajob.catalogue import GIB, INSTANCE_TYPES
from llamajob.jobfile import load_job
from llamajob.plan import (
    DEFAULT_MFU_BY_FAMILY,
    NXD_TRN1_TENSOR_DEGREES,
    estimate_memory,
    make_plan,
    mfu_family,
    nxd_kv_replicators,
    stage_params,
    suggest_fix,
    validate_layout,
)
from llamajob_trainer.presets import PRESETS


def example(name: str) -> LlamaTrainingJobSpec:
    return load_job(ROOT / "examples" / f"{name}.yaml").spec


def changed(spec: LlamaTrainingJobSpec, **sections: Any) -> LlamaTrainingJobSpec:
    """The spec with some fields of some sections replaced (or a top-level field, given a
    scalar)."""
    data = spec.model_dump()
    for section, values in sections.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    return LlamaTrainingJobSpec.model_validate(data)


def per_core_params(spec: LlamaTrainingJobSpec) -> float:
    par = spec.parallelism
    return stage_params(spec.model.architecture(), par.pipeline) / par.tensor


# --- what the NxD backend holds per parameter ---------------------------------------------------
@pytest.mark.parametrize(
    ("name", "sections", "dp"),
    [
        ("llama3-8b", {}, 1),
        ("llama3-8b", {"parallelism": {"tensor": 8, "kv_replicator": 1}}, 4),
        ("llama3-70b", {}, 2),
        ("llama3-70b", {"cluster": {"nodes": 32}}, 4),
    ],
)
def test_zero1_holds_4_plus_4_plus_12_over_dp_and_gathers_4_plus_4_over_dp(
    name: str, sections: dict[str, dict[str, Any]], dp: int
) -> None:
    spec = changed(example(name), **sections)
    assert make_plan(spec).data_parallel == dp
    m, n = estimate_memory(spec, dp), per_core_params(spec)
    # fp32 parameter and gradient; ZeRO-1's fp32 shard copy and AdamW's two moments, over DP.
    assert m.weights / n == pytest.approx(4)
    assert m.gradients / n == pytest.approx(4)
    assert m.optimizer / n == pytest.approx(12 / dp)
    # During the step: the full-size all-gather of the updated shards and the gradient shard.
    assert m.step_buffer / n == pytest.approx(4 + 4 / dp)
    # The states and the larger of the two phases, never both phases at once.
    states = m.weights + m.gradients + m.optimizer + m.reserve
    backward = m.gather_buffer + m.accumulation + m.activations + m.logits
    assert m.total == pytest.approx(states + max(backward, m.step_buffer))


def test_bf16_mixed_keeps_a_bf16_copy_of_every_matmul_weight_and_fp32_does_not() -> None:
    spec = example("llama3-8b")
    arch = spec.model.architecture()
    mixed = estimate_memory(spec, 1)
    matmul = (arch.num_layers * (arch.layer_params() - 2 * arch.hidden_size)
              + arch.embedding_params()) / spec.parallelism.tensor
    assert mixed.gather_buffer == pytest.approx(2 * matmul)
    fp32 = estimate_memory(changed(spec, precision="fp32"), 1)
    assert fp32.gather_buffer == 0
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (
        mixed.weights, mixed.gradients, mixed.optimizer)


def test_without_zero1_the_optimizer_holds_both_moments_and_nothing_is_gathered() -> None:
    spec = changed(example("llama3-70b"), parallelism={"zero1": False})
    m, n = estimate_memory(spec, 2), per_core_params(spec)
    assert m.optimizer / n == pytest.approx(8)
    assert m.step_buffer == 0


def test_the_8b_example_counts_fp32_weights_and_fits() -> None:
    plan = make_plan(example("llama3-8b"))
    assert plan.valid, plan.problems()
    assert plan.memory is not None
    # 4 + 4 + 12 bytes of states per parameter at DP 1 (about 4.7 GiB at TP 32), plus the
    # backward phase; about 7.7 GiB of 16.
    assert plan.memory.weights == pytest.approx(4 * plan.params_per_core)
    assert 7 < plan.memory_per_core_gib < 8.5


def test_the_70b_example_fits_on_16_nodes_with_its_fp32_states() -> None:
    plan = make_plan(example("llama3-70b"))
    assert plan.valid, plan.problems()
    assert plan.memory is not None and plan.memory.weights == pytest.approx(
        4 * plan.params_per_core)
    assert plan.memory_per_core_gib < 8


# --- the recomputed layer's attention scores ----------------------------------------------------
def scores_bytes(spec: LlamaTrainingJobSpec) -> float:
    """One layer's Korthikanti attention-score term, 5 * a * s^2 * b / t bytes."""
    arch = spec.model.architecture()
    s, b = spec.data.seq_length, spec.batch.micro_batch_size
    return 5.0 * arch.num_heads * s * s * b / spec.parallelism.tensor


def test_full_recompute_working_set_holds_one_layers_attention_scores() -> None:
    spec = changed(example("llama3-8b"), parallelism={"activation_checkpointing": "full"})
    arch, tp = spec.model.architecture(), spec.parallelism.tensor
    s, h = spec.data.seq_length, arch.hidden_size
    m = estimate_memory(spec, 1)
    inputs = 2.0 * s * h / tp * arch.num_layers  # each layer's input, sequence-parallel
    layer = s * h * 34.0 / tp  # one layer's working set, scores aside
    assert m.activations == pytest.approx(inputs + layer + scores_bytes(spec))
    # At seq 8192 and TP 32 the scores are 320 MiB: most of the working set.
    assert scores_bytes(spec) / GIB == pytest.approx(0.3125)


def test_selective_recompute_rebuilds_one_layers_scores_during_backward() -> None:
    spec = example("llama3-8b")  # selective
    arch, tp = spec.model.architecture(), spec.parallelism.tensor
    s, h = spec.data.seq_length, arch.hidden_size
    m = estimate_memory(spec, 1)
    assert m.activations == pytest.approx(s * h * 34.0 / tp * arch.num_layers + scores_bytes(spec))


# --- tensor degrees the runtime refuses on trn1 -------------------------------------------------
@pytest.mark.parametrize("instance", ["ml.trn1.32xlarge", "ml.trn1n.32xlarge"])
def test_tp16_dp2_on_one_trn1_node_is_refused_naming_the_field(instance: str) -> None:
    spec = changed(example("llama3-8b"), parallelism={"tensor": 16, "kv_replicator": 2},
                   cluster={"instance_type": instance})
    (err,) = validate_layout(spec)
    assert err.field == "spec.parallelism.tensor"
    assert "replica-group" in err.message and err.message.endswith("nearest valid: 8")
    assert not make_plan(spec).valid


def test_every_other_degree_of_a_trn1_node_validates() -> None:
    base = example("llama3-8b")
    for tp in NXD_TRN1_TENSOR_DEGREES:
        rep = nxd_kv_replicators(base.model.architecture(), tp)[0]
        spec = changed(base, parallelism={"tensor": tp, "kv_replicator": rep})
        assert not validate_layout(spec), tp


def test_trn2_under_nxd_is_not_held_to_the_trn1_degrees() -> None:
    spec = changed(example("llama3-8b"), backend="nxd",
                   parallelism={"tensor": 16, "kv_replicator": 2},
                   cluster={"instance_type": "ml.trn2.48xlarge"})
    assert not [e for e in validate_layout(spec) if e.field == "spec.parallelism.tensor"]


def test_8b_at_tp8_on_one_node_is_told_tp32_never_tp16() -> None:
    spec = changed(example("llama3-8b"), parallelism={"tensor": 8, "kv_replicator": 1})
    plan = make_plan(spec)
    assert not plan.errors and not plan.fits
    assert plan.suggestion == "tensor: 8 -> 32 (with kvReplicator: 1 -> 4)"
    fixed = make_plan(changed(spec, parallelism={"tensor": 32, "kv_replicator": 4}))
    assert fixed.valid


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize(("tp", "rep"), [(1, 1), (2, 1), (4, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_no_suggestion_on_trn1_is_a_layout_the_runtime_refuses(
    recompute: str, tp: int, rep: int, mbs: int
) -> None:
    spec = changed(
        example("llama3-8b"),
        parallelism={"tensor": tp, "kv_replicator": rep, "activation_checkpointing": recompute},
        batch={"micro_batch_size": mbs, "global_batch_size": 1024},
    )
    if validate_layout(spec):
        pytest.skip("not a valid starting layout")
    suggestion = suggest_fix(spec)
    assert suggestion is None or "-> 16" not in suggestion.split("(")[0], suggestion


# --- kv replication is checked by the planner, naming the field ---------------------------------
@pytest.mark.parametrize(
    ("name", "tp", "rep", "fragment"),
    [
        ("llama3-8b", 32, 3, "3 does not divide tensor 32"),
        ("llama3-8b", 32, 2, "8 kv heads x kvReplicator 2 is not divisible by tensor 32"),
        ("llama3-8b", 32, 8, "8 does not divide the 4 query heads per kv head"),
        ("llama3-8b", 8, 8, "8 does not divide the 4 query heads per kv head"),
        ("llama3-70b", 32, 16, "16 does not divide the 8 query heads per kv head"),
        ("llama3-8b", 1, 4, "4 does not divide tensor 1"),
    ],
)
def test_kv_replicator_problems_name_the_field_and_the_fix(
    name: str, tp: int, rep: int, fragment: str
) -> None:
    spec = changed(example(name), parallelism={"tensor": tp, "kv_replicator": rep})
    errors = validate_layout(spec)
    (err,) = [e for e in errors if e.field == "spec.parallelism.kvReplicator"]
    assert fragment in err.message, err.message
    arch = spec.model.architecture()
    fix = int(err.message.rsplit("use kvReplicator: ", 1)[1])
    assert fix in nxd_kv_replicators(arch, tp)
    assert not validate_layout(changed(spec, parallelism={"kv_replicator": fix}))


def test_on_trn2_nxd_holds_one_kv_head_per_rank() -> None:
    spec = changed(example("llama3-8b"), backend="nxd",
                   parallelism={"tensor": 8, "kv_replicator": 4},
                   cluster={"instance_type": "ml.trn2.48xlarge"})
    (err,) = [e for e in validate_layout(spec) if e.field == "spec.parallelism.kvReplicator"]
    assert "one kv head per rank" in err.message and err.message.endswith("kvReplicator: 1")
    assert nxd_kv_replicators(PRESETS["llama3-8b"], 32, "trn2") == [4]
    assert nxd_kv_replicators(PRESETS["llama3-8b"], 8, "trn2") == [1]


def test_kv_replicators_follow_nxd_and_the_trainer() -> None:
    # 8 kv heads over 32 ranks need 4 copies; 8 or more would split a kv head's 4 query heads.
    assert nxd_kv_replicators(PRESETS["llama3-8b"], 32) == [4]
    assert nxd_kv_replicators(PRESETS["llama3-70b"], 32) == [4, 8]
    assert nxd_kv_replicators(PRESETS["llama3-8b"], 8) == [1, 2, 4]


def test_a_vocabulary_the_tensor_degree_does_not_split_is_refused() -> None:
    model = {"preset": "llama3-8b", "vocab_size": 128260}  # 4 mod 32
    spec = changed(example("llama3-8b"), model=model)
    (err,) = validate_layout(spec)
    assert err.field == "spec.parallelism.tensor" and "model.vocabSize 128260" in err.message


# --- calibration: step times against AWS's published trn1 runs ----------------------------------
# AWS's Neuron 2.24 trn1 training table (training_data_decoder.csv): Llama-3.1-70B, 32 nodes,
# TP=32 PP=8, global batch 1024, sequence 8192, 7.94 seq/s. The SageMaker HyperPod Llama 3 70B
# trn1 guide's log of NxD's run_llama3_70B_tp_pp.sh on 16 nodes: 243.8 s/step (steps 2 to 5).
PUBLISHED_70B = [(32, 1024 / 7.94), (16, 243.8)]


@pytest.mark.parametrize(("nodes", "seconds"), PUBLISHED_70B)
def test_70b_step_time_is_within_10_percent_of_publication(nodes: int, seconds: float) -> None:
    spec = changed(example("llama3-70b"), cluster={"nodes": nodes},
                   model={"preset": "llama3.1-70b"})
    plan = make_plan(spec)
    assert mfu_family(spec) == "trn1+pp"
    assert plan.assumed_mfu == DEFAULT_MFU_BY_FAMILY["trn1+pp"]
    assert plan.step_seconds == pytest.approx(seconds, rel=0.10)


def test_8b_step_time_without_pipeline_is_within_10_percent_of_publication() -> None:
    # The same table: Llama-3.1-8B, 32 nodes, TP=32 DP=32 ZeRO-1, 47.95 seq/s.
    spec = changed(example("llama3-8b"), cluster={"nodes": 32}, model={"preset": "llama3.1-8b"})
    plan = make_plan(spec)
    assert mfu_family(spec) == "trn1"
    assert plan.step_seconds == pytest.approx(1024 / 47.95, rel=0.10)


def test_only_trn1_splits_its_mfu_by_pipeline() -> None:
    for name, inst in INSTANCE_TYPES.items():
        if inst.family == "trn1":
            continue
        spec = changed(example("tiny"), cluster={"instance_type": name, "nodes": 2,
                                                 "hyperpod": name.startswith("ml.")},
                       parallelism={"pipeline": 2})
        assert mfu_family(spec) == inst.family
