"""The planner reproduces what the seeds observed and names the field and fix for bad layouts."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from conftest import ROOT
from llamajob.api import LlamaTrainingJobSpec
from llamajob.catalogue import GIB, INSTANCE_TYPES
from llamajob.jobfile import load_job
from llamajob.plan import (
    DEFAULT_MFU,
    DEFAULT_MFU_BY_FAMILY,
    HOST_MEMORY_PER_RANK_GIB,
    RUNTIME_RESERVE_GIB,
    estimate_memory,
    flops_per_token,
    make_plan,
    pod_cpu_memory,
    quantity,
    validate_layout,
)
from llamajob_trainer.presets import PRESETS


def example(name: str) -> LlamaTrainingJobSpec:
    return load_job(ROOT / "examples" / f"{name}.yaml").spec


def changed(spec: LlamaTrainingJobSpec, **sections: dict[str, Any]) -> LlamaTrainingJobSpec:
    data = spec.model_dump()
    for section, values in sections.items():
        if isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    return LlamaTrainingJobSpec.model_validate(data)


def test_8b_at_tp8_on_one_node_does_not_fit_and_a_fix_is_proposed() -> None:
    spec = changed(example("llama3-8b"), parallelism={"tensor": 8, "kv_replicator": 1})
    plan = make_plan(spec)
    assert not plan.errors
    assert not plan.fits
    assert plan.memory_per_core_gib > 16
    assert plan.suggestion is not None and plan.suggestion.startswith("tensor: 8 -> ")
    # The proposal itself must validate and fit.
    new_tp = int(plan.suggestion.split("-> ")[1].split()[0])
    rep = 32 // new_tp if "kvReplicator" not in plan.suggestion else new_tp // 8
    fixed = make_plan(changed(spec, parallelism={"tensor": new_tp, "kv_replicator": rep}))
    assert fixed.valid
    (problem,) = plan.problems()
    assert "16 GiB" in problem.message and plan.suggestion in problem.message


def test_8b_at_tp32_fits() -> None:
    plan = make_plan(example("llama3-8b"))
    assert plan.valid
    assert (plan.world_size, plan.data_parallel, plan.grad_accum, plan.pods) == (32, 1, 1024, 1)
    assert 0 < plan.margin_gib < 16


def test_70b_example_fits_on_16_nodes() -> None:
    plan = make_plan(example("llama3-70b"))
    assert plan.valid
    assert (plan.world_size, plan.data_parallel, plan.pods, plan.grad_accum) == (512, 2, 16, 512)


def test_70b_on_one_node_does_not_fit() -> None:
    spec = changed(example("llama3-70b"), cluster={"nodes": 1}, parallelism={"pipeline": 1})
    plan = make_plan(spec)
    assert not plan.fits and plan.valid is False


def test_8b_for_15t_tokens_on_one_node_at_the_seeds_634_tflops() -> None:
    plan = make_plan(example("llama3-8b"), tflops_per_node=634, tokens=15 * 10**12)
    years = plan.total_seconds / (365.25 * 86400)
    assert 30 < years < 60, years  # the seed's 6ND estimate says 36 years
    assert 5e6 < plan.total_cost_usd < 1.2e7, plan.total_cost_usd  # and about $7M


def test_flops_per_token_is_6n_plus_attention() -> None:
    arch = PRESETS["llama3-8b"]
    f = flops_per_token(arch, 8192)
    six_n = 6 * (arch.num_params() - arch.embedding_params())
    assert f == pytest.approx(six_n + 12 * 32 * 4096 * 8192)


def test_step_time_scales_with_nodes_and_mfu() -> None:
    base = make_plan(example("llama3-70b"))
    assert base.assumed_mfu is not None
    doubled = make_plan(example("llama3-70b"), mfu=2 * base.assumed_mfu)
    assert doubled.step_seconds == pytest.approx(base.step_seconds / 2)
    cheaper = make_plan(example("llama3-70b"), price_per_hour=10.75)
    assert cheaper.total_cost_usd == pytest.approx(base.total_cost_usd / 2)


def test_zero1_shards_optimizer_state_over_data_parallel() -> None:
    spec = changed(example("llama3-70b"), cluster={"nodes": 32})  # DP 4 instead of 2
    two, four = estimate_memory(example("llama3-70b"), 2), estimate_memory(spec, 4)
    assert four.optimizer == pytest.approx(two.optimizer / 2)
    assert four.weights == two.weights


def test_recompute_reduces_activation_memory() -> None:
    spec = example("llama3-8b")
    none = estimate_memory(changed(spec, parallelism={"activation_checkpointing": "none"}), 1)
    sel = estimate_memory(changed(spec, parallelism={"activation_checkpointing": "selective"}), 1)
    full = estimate_memory(changed(spec, parallelism={"activation_checkpointing": "full"}), 1)
    assert none.activations > sel.activations > full.activations
    # Without recompute at seq 8192 the attention scores dominate (Korthikanti's 5as/h term).
    assert none.activations > 5 * sel.activations
    assert full.total < 16 * GIB


@pytest.mark.parametrize(
    ("example_name", "sections", "field", "fragment"),
    [
        ("llama3-8b", {"parallelism": {"tensor": 12}}, "spec.parallelism.tensor", "nearest valid"),
        (
            "llama3-70b",
            {"parallelism": {"pipeline": 3}},
            "spec.parallelism.pipeline",
            "nearest valid pipeline",
        ),
        (
            "llama3-8b",
            {"parallelism": {"kv_replicator": 1}},
            "spec.parallelism.kvReplicator",
            "use kvReplicator: 4",
        ),
        (
            "llama3-8b",
            {"model": {"preset": "llama3-8b", "num_heads": 24, "hidden_size": 4608}},
            "spec.parallelism.tensor",
            "24 attention heads",
        ),
        (
            "llama3-70b",
            {"cluster": {"nodes": 24}, "parallelism": {"pipeline": 6}},
            "spec.parallelism.pipeline",
            "80 layers",
        ),
        (
            "llama3-70b",
            {"parallelism": {"virtual_pipeline": 3}},
            "spec.parallelism.virtualPipeline",
            "nearest valid: ",
        ),
        (
            "llama3-70b",
            {"batch": {"global_batch_size": 1024, "micro_batch_size": 3}},
            "spec.batch.globalBatchSize",
            "nearest valid: 1026",
        ),
        (
            "llama3-70b",
            {"batch": {"global_batch_size": 1001, "micro_batch_size": 1}},
            "spec.batch.globalBatchSize",
            "nearest valid: 1000",
        ),
        (
            "llama3-70b",
            {"batch": {"global_batch_size": 8, "micro_batch_size": 1}},
            "spec.batch.globalBatchSize",
            "at least 8 micro-batches",
        ),
        ("tiny", {"data": {"seq_length": 4096}}, "spec.data.seqLength", "maxPositionEmbeddings"),
        ("tiny", {"backend": "nxd"}, "spec.backend", "Trainium"),
        (
            "tiny",
            {"parallelism": {"tensor": 2, "kv_replicator": 2}},
            "spec.parallelism.kvReplicator",
            "only the nxd backend",
        ),
        (
            "llama3-8b",
            {"cluster": {"nodes": 2, "processes_per_node": 32}, "parallelism": {"tensor": 64}},
            "spec.parallelism.tensor",
            "spans nodes",
        ),
        (
            "llama3-8b",
            {"compile": {"torch_compile": True}},
            "spec.compile.torchCompile",
            "neuron_parallel_compile",
        ),
        (
            "tiny",
            {"compile": {"torch_compile": True}, "parallelism": {"tensor": 2}},
            "spec.compile.torchCompile",
            "use tensor 1 with fsdp",
        ),
    ],
)
def test_invalid_layouts_name_the_field_and_the_fix(
    example_name: str, sections: dict[str, Any], field: str, fragment: str
) -> None:
    spec = changed(example(example_name), **sections)
    errors = validate_layout(spec)
    assert errors, "expected a validation error"
    fields = {e.field for e in errors}
    assert field in fields, errors
    message = next(e.message for e in errors if e.field == field)
    assert fragment in message, message
    plan = make_plan(spec)
    assert not plan.valid and plan.memory is None


def test_suggested_global_batch_is_actually_valid() -> None:
    spec = changed(example("llama3-70b"), batch={"global_batch_size": 1001, "micro_batch_size": 1})
    (err,) = [e for e in validate_layout(spec) if e.field == "spec.batch.globalBatchSize"]
    fixed = int(err.message.rsplit("nearest valid: ", 1)[1])
    assert not validate_layout(changed(spec, batch={"global_batch_size": fixed}))


# --- the torch backend's memory model -----------------------------------------------------------
def torch_spec(instance: str = "cpu", nodes: int = 1, **sections: Any) -> LlamaTrainingJobSpec:
    """A torch-backend job: Llama-3-8B at seq 2048, one sequence per rank and step, unless
    `sections` say otherwise."""
    data: dict[str, Any] = {
        "backend": "torch",
        "model": {"preset": "llama3-8b"},
        "data": {"seq_length": 2048},
        "parallelism": {"zero1": False},
        "batch": {"micro_batch_size": 1, "global_batch_size": 2 * nodes},
        "cluster": {"nodes": nodes, "instance_type": instance},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values} if isinstance(values, dict) else values
    return LlamaTrainingJobSpec.model_validate(data)


@pytest.mark.parametrize("mode", ["bf16", "autocast", "fp32"])
def test_block_activations_are_what_the_model_saves_for_backward(mode: str) -> None:
    # Every tensor autograd keeps for one transformer block of model.py, counted by storage, on
    # CPU: the planner's per-block formula must account for each byte. "bf16" is how FSDP2's
    # MixedPrecisionPolicy runs the block (bf16 parameters and inputs), "autocast" how
    # bf16-mixed runs without FSDP (fp32 parameters and residual under torch.autocast).
    import torch
    from llamajob.plan import torch_block_saved_bytes
    from llamajob_trainer.model import TransformerBlock, rope_tables
    from llamajob_trainer.presets import Architecture

    # Every dimension different, so a term counted against the wrong one shows.
    arch = Architecture(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                        intermediate_size=704, vocab_size=512, rope_theta=10000.0,
                        max_position_embeddings=1024)
    seq, micro = 192, 3
    torch.manual_seed(0)
    block = TransformerBlock(arch)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    block = block.to(dtype)
    cos, sin = rope_tables(arch.head_dim, arch.max_position_embeddings, arch.rope_theta)
    x = torch.randn(micro, seq, arch.hidden_size, dtype=dtype, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    tables = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params | tables:  # those exist whether or not it trains
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        block(x, cos, sin).float().sum().backward()

    activations = torch_block_saved_bytes(arch, seq, micro, mode)
    # autocast's bf16 copy of each matmul weight, which the planner counts apart
    # (gather_buffer) because it is per step, not per micro-batch
    casts = 2 * (arch.layer_params() - 2 * arch.hidden_size) if mode == "autocast" else 0
    assert sum(saved.values()) == activations + casts
    # Selective recompute drops exactly the SDPA output and its log-sum-exp.
    dropped = activations - torch_block_saved_bytes(arch, seq, micro, mode, recompute_core=True)
    c = 2 if mode != "fp32" else 4
    assert dropped == seq * micro * (c * arch.hidden_size + 4 * arch.num_heads)


def test_fsdp_without_gradient_sync_keeps_every_unsharded_gradient_in_fp32() -> None:
    # The trainer turns FSDP's gradient sync off for all but the last micro-batch of a step;
    # the planner's accumulation term assumes FSDP2 then keeps each gradient unsharded in the
    # reduce dtype (fp32) until the sync. Checked on the torch the trainer runs on, one rank.
    import torch
    import torch.distributed as dist
    from llamajob_trainer.model import Llama
    from llamajob_trainer.presets import PRESETS
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        arch = PRESETS["tiny"]
        model = Llama(arch, max_seq_len=64)
        mesh = init_device_mesh("cpu", (1,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.set_requires_gradient_sync(False)
        model(torch.randint(0, arch.vocab_size, (2, 64))).float().sum().backward()
        held = [
            fsdp_param.unsharded_accumulated_grad
            for module in [*model.layers.values(), model]
            for fsdp_param in _get_module_fsdp_state(module)._fsdp_param_group.fsdp_params
        ]
        assert all(g is not None and g.dtype == torch.float32 for g in held)
        assert sum(g.numel() * g.element_size() for g in held) == 4 * arch.num_params()
    finally:
        dist.destroy_process_group()

    one = estimate_memory(torch_spec(parallelism={"fsdp": True}), 2)
    accumulating = torch_spec(parallelism={"fsdp": True}, batch={"global_batch_size": 4})
    two = estimate_memory(accumulating, 2)
    assert one.accumulation == 0
    assert two.accumulation == 4 * PRESETS["llama3-8b"].num_params()


def test_fsdp_shards_the_fp32_states_and_ddp_replicates_them() -> None:
    n = PRESETS["llama3-8b"].num_params()
    ddp = estimate_memory(torch_spec(), 2)
    fsdp = estimate_memory(torch_spec(parallelism={"fsdp": True}), 2)
    # Parameters stay fp32 under bf16-mixed on this backend: 4 + 4 + 8 bytes per parameter.
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * n, 4 * n, 8 * n)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (2 * n, 2 * n, 4 * n)
    # DDP computes under autocast: a bf16 copy of every matmul weight (not of the embedding,
    # whose lookup autocast leaves alone). FSDP gathers bf16 blocks and the root instead.
    arch = PRESETS["llama3-8b"]
    matmul = arch.num_layers * (arch.layer_params() - 2 * arch.hidden_size) + (
        arch.embedding_params()
    )
    assert ddp.gather_buffer == 2 * matmul
    assert 0 < fsdp.gather_buffer < ddp.gather_buffer
    # autocast leaves the residual stream in fp32, FSDP's bf16 parameters do not.
    assert ddp.activations > fsdp.activations
    fp32 = estimate_memory(torch_spec(precision="fp32"), 2)
    assert fp32.gather_buffer == 0 and fp32.weights == ddp.weights


def test_the_step_buffer_competes_with_activations_instead_of_adding_to_them() -> None:
    # Tensor parallel without FSDP all-reduces one flat copy of every gradient after backward,
    # when activations are gone: the total is the larger phase.
    spec = torch_spec(nodes=2, parallelism={"tensor": 2}, batch={"global_batch_size": 2})
    m = estimate_memory(spec, 2)
    assert m.step_buffer == 4 * PRESETS["llama3-8b"].num_params() / 2
    states = m.weights + m.gradients + m.optimizer + m.reserve
    backward = m.gather_buffer + m.accumulation + m.activations + m.logits
    assert m.total == pytest.approx(states + max(backward, m.step_buffer))
    assert m.total < states + backward + m.step_buffer


def test_a_ddp_layout_that_does_not_fit_is_offered_fsdp_first() -> None:
    # 254M parameters: two CPU ranks of 4 GiB cannot each hold 16 bytes of all of them, but can
    # hold half.
    model = {"preset": "tiny", "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 4,
             "num_layers": 16, "vocab_size": 32000, "intermediate_size": 2816}
    plan = make_plan(torch_spec(model=model, data={"seq_length": 256}))
    assert not plan.fits and plan.suggestion == "fsdp: false -> true"
    fixed = make_plan(torch_spec(model=model, data={"seq_length": 256},
                                 parallelism={"fsdp": True}))
    assert fixed.valid


@pytest.mark.parametrize("name", sorted(INSTANCE_TYPES))
def test_every_catalogue_instance_type_plans_a_small_job(name: str) -> None:
    inst = INSTANCE_TYPES[name]
    spec = LlamaTrainingJobSpec.model_validate({
        "model": {"preset": "tiny"},
        "data": {"seq_length": 512},
        "parallelism": {"fsdp": inst.backend == "torch", "activation_checkpointing": "full"},
        "batch": {"micro_batch_size": 1, "global_batch_size": inst.cores_per_node},
        # Types without an ml. name are not HyperPod's: plain EKS.
        "cluster": {"nodes": 1, "instance_type": name,
                    "hyperpod": name.startswith("ml.") or name == "cpu"},
    })
    plan = make_plan(spec)
    assert plan.valid, plan.problems()
    assert plan.backend == inst.backend and plan.device == inst.device
    assert plan.memory is not None
    assert plan.memory.reserve == RUNTIME_RESERVE_GIB[inst.family] * GIB
    assert plan.assumed_mfu == DEFAULT_MFU_BY_FAMILY[inst.family]
    assert plan.step_seconds > 0 and plan.total_seconds > 0
    assert plan.total_cost_usd == pytest.approx(
        plan.total_seconds / 3600 * inst.price_per_hour
    )


def test_a_family_the_planner_does_not_know_gets_the_cautious_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A type added to the catalogue before the planner learns its family still plans: the
    # largest reserve, the generic MFU.
    monkeypatch.setitem(INSTANCE_TYPES, "cpu", replace(INSTANCE_TYPES["cpu"], family="tpu"))
    plan = make_plan(example("tiny"))
    assert plan.memory is not None
    assert plan.memory.reserve == max(RUNTIME_RESERVE_GIB.values()) * GIB
    assert plan.assumed_mfu == DEFAULT_MFU


def test_gpu_ranks_are_limited_to_the_gpus_of_the_node() -> None:
    name, inst = next((n, t) for n, t in INSTANCE_TYPES.items() if t.family == "gpu")
    spec = torch_spec(name, cluster={"processes_per_node": inst.cores_per_node * 2})
    (err,) = [e for e in validate_layout(spec) if e.field == "spec.cluster.processesPerNode"]
    assert f"the {inst.cores_per_node} GPUs of {name}" in err.message


def test_a_type_hyperpod_does_not_offer_needs_hyperpod_false() -> None:
    spec = LlamaTrainingJobSpec.model_validate({
        "model": {"preset": "tiny"},
        "parallelism": {"fsdp": True},
        "batch": {"micro_batch_size": 1, "global_batch_size": 64},
        "cluster": {"nodes": 1, "instance_type": "trn3.48xlarge"},
    })
    (problem,) = make_plan(spec).problems()
    assert problem.field == "spec.cluster.hyperpod" and "hyperpod: false" in problem.message


@pytest.mark.parametrize(
    ("text", "value"),
    [("64Gi", 64 * 2**30), ("460Gi", 460 * 2**30), ("4096Mi", 4 * 2**30), ("1Ti", 2**40),
     ("120", 120), ("500m", Decimal("0.5")), ("1.5", Decimal("1.5")), (".5", Decimal("0.5")),
     ("1e3", 1000), ("+2Ki", 2048), ("2G", 2 * 10**9), ("3k", 3000)],
)
def test_quantities_are_read_as_kubernetes_does(text: str, value: Decimal) -> None:
    assert quantity(text) == value


def test_cpu_and_memory_default_to_the_instance_type_and_yield_to_the_user() -> None:
    spec = example("llama3-70b")  # ml.trn1.32xlarge: 128 vCPUs, 512 GiB
    assert pod_cpu_memory(spec) == {"cpu": "115", "memory": "460Gi"}
    spec = changed(spec, cluster={"cpu": "100", "memory": "400Gi"})
    assert pod_cpu_memory(spec) == {"cpu": "100", "memory": "400Gi"}
    # The cpu type is any machine: no default, the user's if given.
    assert pod_cpu_memory(example("tiny")) == {}
    assert pod_cpu_memory(changed(example("tiny"), cluster={"memory": "16Gi"})) == {
        "memory": "16Gi"
    }


def test_shm_must_leave_the_ranks_room_in_the_memory_limit() -> None:
    tiny = example("tiny")  # 2 ranks, shmSize 64Gi by default
    ppn = tiny.cluster.processes_per_node or INSTANCE_TYPES["cpu"].cores_per_node
    kept = ppn * HOST_MEMORY_PER_RANK_GIB
    fits = changed(tiny, cluster={"memory": f"{64 + kept}Gi"})
    assert not [e for e in validate_layout(fits) if e.field == "spec.cluster.shmSize"]
    small = changed(tiny, cluster={"memory": "16Gi"})
    (err,) = [e for e in validate_layout(small) if e.field == "spec.cluster.shmSize"]
    assert f"at most {16 - kept}Gi" in err.message
    assert f"spec.cluster.memory to at least {64 + kept}Gi" in err.message
    assert make_plan(changed(small, cluster={"shm_size": f"{16 - kept}Gi"})).valid
