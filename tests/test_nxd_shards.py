"""The nxd backend's tensor-parallel shard maps (``parallel/nxd_shards.py``): reassembly, the
sharded model equal to the unsharded one, NxD's kv arrangement, and pretrained import/export
through NxD's layer names. Pure torch: NxD itself is not installed here.

The head structures are Llama 3 8B's (32 q heads, 8 kv heads) and 70B's (64 q, 8 kv) at tensor
degree 32 with kvReplicator 4, as the trn1 examples run them; widths are shrunk so that every
rank's attention runs in milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from llamajob_trainer.errors import CheckpointError, ConfigError
from llamajob_trainer.hf import (
    apply_full_state_dict,
    apply_pretrained,
    hf_config,
    hf_state_dict_from_nxd,
    load_pretrained,
)
from llamajob_trainer.model import Attention, FeedForward, rope_tables, to_hf_state_dict
from llamajob_trainer.parallel.layout import LayoutError
from llamajob_trainer.parallel.nxd_shards import Cut, RankShards, ShardPlan
from llamajob_trainer.presets import PRESETS, Architecture
from safetensors.torch import save_file
from torch import Tensor, nn

TP, KV_REP = 32, 4
# head_dim 4 (8B) and 2 (70B); every width divisible by the tensor degree.
EIGHT_B = dataclasses.replace(
    PRESETS["llama3-8b"], hidden_size=128, intermediate_size=96, vocab_size=160, num_layers=1
)
SEVENTY_B = dataclasses.replace(
    PRESETS["llama3-70b"], hidden_size=128, intermediate_size=96, vocab_size=160, num_layers=1
)
MODELS = {"8b": EIGHT_B, "70b": SEVENTY_B}
PLATFORMS = ("trn1", "trn2")


def plan_for(model: str, platform: str) -> ShardPlan:
    return ShardPlan(MODELS[model], TP, KV_REP, platform)  # type: ignore[arg-type]


def random_full(plan: ShardPlan, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        fqn: torch.randn(plan.full_shape(fqn), generator=gen, dtype=torch.float64)
        for fqn in plan.fqns()
    }


both = pytest.mark.parametrize(("model", "platform"), [(m, p) for m in MODELS for p in PLATFORMS])


# --- (a) reassembly ------------------------------------------------------------------------


@both
def test_every_ranks_shards_reassemble_the_full_tensors(model: str, platform: str) -> None:
    plan = plan_for(model, platform)
    full = random_full(plan)
    assert set(full) == {
        "tok_embeddings.weight",
        "norm.weight",
        "output.weight",
        *(
            f"layers.0.{rest}"
            for rest in (
                "attention.wq.weight",
                "attention.wk.weight",
                "attention.wv.weight",
                "attention.wo.weight",
                "feed_forward.w1.weight",
                "feed_forward.w3.weight",
                "feed_forward.w2.weight",
                "attention_norm.weight",
                "ffn_norm.weight",
            )
        ),
    }
    for fqn, tensor in full.items():
        shards = [plan.shard(fqn, tensor, rank) for rank in range(TP)]
        assert all(tuple(s.shape) == plan.shard_shape(fqn, r) for r, s in enumerate(shards))
        assert torch.equal(plan.assemble(fqn, iter(shards)), tensor), fqn


def test_reassembly_rejects_kv_copies_that_disagree() -> None:
    plan = plan_for("8b", "trn1")
    fqn = "layers.0.attention.wk.weight"
    full = random_full(plan)[fqn]
    shards = [plan.shard(fqn, full, rank).clone() for rank in range(TP)]
    shards[8] += 1e-6  # rank 8 holds a copy of rank 0's kv head on trn1
    with pytest.raises(ValueError, match="ranks 0 and 8 differ"):
        plan.assemble(fqn, shards)


# --- (b) the sharded model is the unsharded one ----------------------------------------------


def linear(weight: Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.clone())
    return layer


def attention(arch: Architecture, wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor) -> Attention:
    """The model's own attention (heads from the projections' widths, grouped-query by SDPA's
    ``enable_gqa``, as each nxd rank runs it) with the given, possibly sharded, weights."""
    att = Attention(arch)
    att.wq, att.wk, att.wv, att.wo = linear(wq), linear(wk), linear(wv), linear(wo)
    return att


def feed_forward(arch: Architecture, w1: Tensor, w3: Tensor, w2: Tensor) -> FeedForward:
    ff = FeedForward(arch)
    ff.w1, ff.w3, ff.w2 = linear(w1), linear(w3), linear(w2)
    return ff


def tensor_parallel_attention(plan: ShardPlan, full: dict[str, Tensor], x: Tensor) -> Tensor:
    """Every rank's attention over its local q and kv heads times its wo shard, summed over
    ranks (RowParallelLinear's all-reduce)."""
    a = plan.arch
    cos, sin = rope_tables(a.head_dim, x.shape[1], a.rope_theta)
    names = [f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
    total = torch.zeros_like(x)
    for rank in range(plan.tp):
        total += attention(a, *(plan.shard(n, full[n], rank) for n in names))(x, cos, sin)
    return total


def full_attention(plan: ShardPlan, full: dict[str, Tensor], x: Tensor) -> Tensor:
    a = plan.arch
    cos, sin = rope_tables(a.head_dim, x.shape[1], a.rope_theta)
    names = [f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
    return attention(a, *(full[n] for n in names))(x, cos, sin)


@both
@torch.no_grad()
def test_tensor_parallel_attention_equals_the_unsharded_attention(
    model: str, platform: str
) -> None:
    plan = plan_for(model, platform)
    full = random_full(plan)
    x = torch.randn(2, 7, plan.arch.hidden_size, dtype=torch.float64)
    expected = full_attention(plan, full, x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(tensor_parallel_attention(plan, full, x), expected)


@both
@torch.no_grad()
def test_tensor_parallel_mlp_embedding_and_head_equal_the_unsharded_ones(
    model: str, platform: str
) -> None:
    plan = plan_for(model, platform)
    a = plan.arch
    full = random_full(plan)
    x = torch.randn(2, 7, a.hidden_size, dtype=torch.float64)

    names = [f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w3", "w2")]
    expected = feed_forward(a, *(full[n] for n in names))(x)
    sharded = sum(
        feed_forward(a, *(plan.shard(n, full[n], rank) for n in names))(x) for rank in range(TP)
    )
    torch.testing.assert_close(sharded, expected)

    # Vocabulary-parallel embedding: a rank looks up the tokens in its rows, zeros elsewhere.
    tokens = torch.randint(0, a.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    emb = full["tok_embeddings.weight"]
    looked_up = torch.zeros(2, 7, a.hidden_size, dtype=torch.float64)
    for rank in range(TP):
        ((start, stop),) = plan.cut("tok_embeddings.weight", rank).spans
        mine = (tokens >= start) & (tokens < stop)
        rows = plan.shard("tok_embeddings.weight", emb, rank)
        looked_up += rows[(tokens - start).clamp(0, stop - start - 1)] * mine.unsqueeze(-1)
    torch.testing.assert_close(looked_up, emb[tokens])

    # The lm head's logits are the ranks' vocabulary slices side by side.
    head = full["output.weight"]
    logits = torch.cat(
        [x @ plan.shard("output.weight", head, rank).T for rank in range(TP)], dim=-1
    )
    torch.testing.assert_close(logits, x @ head.T)


# --- (c) NxD's arrangement ------------------------------------------------------------------
# From aws-neuron/neuronx-distributed at tag v2.28.0 (commit 22cadad, neuronx-distributed 0.17,
# Neuron 2.28). Kv head of each rank at TP=32 with 8 kv heads and kv_size_multiplier=4:
# modules/qkv_linear.py, _initialize_affine_weight, lines 79-86: trn2 repeat_interleave
# "(K0,K0,K0... )(K1,K1,...)", trn1 repeat "(K0,K1,K2,K3)(K0,K1,K2,K3)...", then
# parallel_layers/layers.py create_local_weight gives rank r the r-th block of rows.
NXD_KV_HEAD_OF_RANK = {
    "trn1": [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7,
             0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7],
    "trn2": [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
             4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7],
}  # fmt: skip
# The ranks whose kv gradients NxD sums (qkv_linear_utils.py lines 125-141):
# parallel_state.py arrange_kv_groups, lines 1605-1645, as GQAQKVColumnParallelLinear calls it
# (initialize_kv_group(kv_size_multiplier), sequential_ranks_in_group=False).
NXD_KV_GROUPS = {
    "trn1": [[0, 8, 16, 24], [1, 9, 17, 25], [2, 10, 18, 26], [3, 11, 19, 27],
             [4, 12, 20, 28], [5, 13, 21, 29], [6, 14, 22, 30], [7, 15, 23, 31]],
    "trn2": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15],
             [16, 17, 18, 19], [20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 30, 31]],
}  # fmt: skip
# First q head of each rank in NxD's own Hugging Face converter, scripts/checkpoint_converter.py
# convert_full_state_to_tp, lines 583-647: on trn1 the q heads are reordered "Q0,Q4,Q8,..." and
# rank r takes the r-th block of (q heads / (kv heads x multiplier)) heads; on trn2 they stay in
# order. o_proj's columns are shuffled the same way (lines 606-610, 648-649).
NXD_FIRST_Q_HEAD_TRN1 = {
    "8b": [0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29,
           2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31],
    "70b": [0, 8, 16, 24, 32, 40, 48, 56, 2, 10, 18, 26, 34, 42, 50, 58,
            4, 12, 20, 28, 36, 44, 52, 60, 6, 14, 22, 30, 38, 46, 54, 62],
}  # fmt: skip


@both
def test_kv_heads_follow_nxds_arrangement_and_kv_groups(model: str, platform: str) -> None:
    plan = plan_for(model, platform)
    assert [plan.kv_heads(rank) for rank in range(TP)] == [
        [head] for head in NXD_KV_HEAD_OF_RANK[platform]
    ]
    for group in NXD_KV_GROUPS[platform]:
        assert len({tuple(plan.kv_heads(rank)) for rank in group}) == 1
    hd = plan.arch.head_dim
    for rank in range(TP):
        head = NXD_KV_HEAD_OF_RANK[platform][rank]
        for w in ("wk", "wv"):
            assert plan.cut(f"layers.0.attention.{w}.weight", rank).spans == (
                (head * hd, (head + 1) * hd),
            )


@both
def test_q_heads_and_wo_columns_follow_nxds_converter(model: str, platform: str) -> None:
    plan = plan_for(model, platform)
    per_rank = plan.arch.num_heads // TP
    hd = plan.arch.head_dim
    for rank in range(TP):
        first = NXD_FIRST_Q_HEAD_TRN1[model][rank] if platform == "trn1" else rank * per_rank
        heads = list(range(first, first + per_rank))
        assert plan.q_heads(rank) == heads
        span = ((first * hd, (first + per_rank) * hd),)
        assert plan.cut("layers.0.attention.wq.weight", rank) == Cut(0, span)
        assert plan.cut("layers.0.attention.wo.weight", rank) == Cut(1, span)
        # Each local q head is served by the kv head standard GQA gives it.
        group = plan.arch.num_heads // plan.arch.num_kv_heads
        assert {h // group for h in heads} == set(plan.kv_heads(rank))


@pytest.mark.parametrize(
    ("heads", "platform", "kv_rep", "tp", "message"),
    [
        (32, "trn2", 2, 8, "one kv head per rank"),  # 8 kv heads x 2 = 16 slots on 8 ranks
        (48, "trn1", 4, 16, "must divide the query heads per kv head"),  # 6 per kv head
        (32, "trn1", 4, 2, "must divide parallelism.tensor"),
        (32, "trn1", 2, 32, "must divide model.numKvHeads x parallelism.kvReplicator"),
        (32, None, 4, 32, "needs the platform"),
    ],
)
def test_layouts_nxd_cannot_run_are_rejected(
    heads: int, platform: str | None, kv_rep: int, tp: int, message: str
) -> None:
    arch = dataclasses.replace(EIGHT_B, num_heads=heads, hidden_size=heads * 2)
    with pytest.raises(LayoutError, match=message):
        ShardPlan(arch, tp, kv_rep, platform)  # type: ignore[arg-type]


def test_trn1_with_several_kv_slots_per_rank_is_still_the_unsharded_attention() -> None:
    # 8 kv heads x 2 copies on 8 ranks: each rank holds two consecutive kv heads.
    plan = ShardPlan(EIGHT_B, 8, 2, "trn1")
    assert [plan.kv_heads(r) for r in range(8)] == [[0, 1], [2, 3], [4, 5], [6, 7]] * 2
    full = random_full(plan)
    x = torch.randn(1, 5, EIGHT_B.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            tensor_parallel_attention(plan, full, x), full_attention(plan, full, x)
        )


# --- the backend's converter, on stand-ins for NxD's layers ----------------------------------


class _Column(nn.Module):
    """NxD's ColumnParallelLinear as one rank sees it: output rows / tp, local matmul."""

    tp = 1  # the tensor degree all stand-ins read, as NxD's layers read parallel_state's

    def __init__(self, fan_in: int, fan_out: int, **_: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out // _Column.tp, fan_in))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


class _Row(_Column):
    """RowParallelLinear without its all-reduce: the test sums the ranks' outputs instead."""

    def __init__(self, fan_in: int, fan_out: int, **_: Any) -> None:
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in // _Column.tp))


class _Embedding(nn.Module):
    def __init__(self, num: int, dim: int, **_: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num // _Column.tp, dim))


class _GQA(nn.Module):
    """GQAQKVColumnParallelLinear(fuse_qkv=False) on one rank (qkv_linear.py lines 449-450)."""

    def __init__(self, fan_in: int, sizes: list[int], kv_size_multiplier: int, **_: Any) -> None:
        super().__init__()
        tp, kv = _Column.tp, sizes[1] * kv_size_multiplier
        self.weight_q = nn.Parameter(torch.empty(sizes[0] // tp, fan_in))
        self.weight_k = nn.Parameter(torch.empty(kv // tp, fan_in))
        self.weight_v = nn.Parameter(torch.empty(kv // tp, fan_in))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return x @ self.weight_q.T, x @ self.weight_k.T, x @ self.weight_v.T


@pytest.fixture
def nxd_stand_ins(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, str], None]:
    """Install module stand-ins for the parts of NxD the converter imports."""
    import enum
    import sys
    import types

    def install(tp: int, platform: str) -> None:
        monkeypatch.setattr(_Column, "tp", tp)
        layers = types.SimpleNamespace(
            ColumnParallelLinear=_Column, RowParallelLinear=_Row, ParallelEmbedding=_Embedding
        )
        hardware = enum.Enum("hardware", {"TRN1": "trn1", "TRN2": "trn2"})
        modules = {
            "neuronx_distributed": types.SimpleNamespace(),
            "neuronx_distributed.parallel_layers": types.SimpleNamespace(layers=layers),
            "neuronx_distributed.parallel_layers.layers": layers,
            "neuronx_distributed.modules": types.SimpleNamespace(),
            "neuronx_distributed.modules.qkv_linear": types.SimpleNamespace(
                GQAQKVColumnParallelLinear=_GQA
            ),
            "neuronx_distributed.utils": types.SimpleNamespace(),
            "neuronx_distributed.utils.utils": types.SimpleNamespace(hardware=hardware),
            "torch_neuronx": types.SimpleNamespace(),
            "torch_neuronx.utils": types.SimpleNamespace(get_platform_target=lambda: platform),
        }
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)

    return install


@both
@torch.no_grad()
def test_the_backends_converter_builds_the_unsharded_block(
    model: str, platform: str, nxd_stand_ins: Callable[[int, str], None]
) -> None:
    from llamajob_trainer.hf import rank_shards_of
    from llamajob_trainer.model import Llama
    from llamajob_trainer.parallel.layout import Layout
    from llamajob_trainer.parallel.neuron_backend import NeuronLlama, _Converter

    nxd_stand_ins(TP, platform)
    arch, seed = MODELS[model], 11
    layout = Layout(
        world_size=TP, pp=1, dp=1, tp=TP, virtual_pipeline=1, schedule="1F1B", fsdp=False,
        sequence_parallel=True, activation_checkpointing="none", bf16=False,
        torch_compile=False, micro_batch_size=1, grad_accum=1, seq_length=8,
    )  # fmt: skip
    reference = Llama(arch, max_seq_len=8)
    reference.init_weights(seed)
    block = reference.layers["0"]
    x = torch.randn(2, 8, arch.hidden_size)
    cos, sin = reference.rope_cos, reference.rope_sin
    attention_sum, mlp_sum = torch.zeros_like(x), torch.zeros_like(x)
    for rank in range(TP):
        with torch.device("meta"):
            converted = NeuronLlama(arch, max_seq_len=8)
        _Converter(arch, layout, seed, KV_REP, rank).apply(converted)
        shards = rank_shards_of(converted)
        assert shards is not None and shards.rank == rank
        assert shards.plan.platform == platform
        mine = converted.layers["0"]
        attention_sum += mine.attention(x, cos, sin)
        mlp_sum += mine.feed_forward(x)
    torch.testing.assert_close(attention_sum, block.attention(x, cos, sin))
    torch.testing.assert_close(mlp_sum, block.feed_forward(x))


# --- pretrained import and export -------------------------------------------------------------

TINY_GQA = Architecture(32, 2, 8, 2, 48, 64, 500000.0, 64)  # 4 q heads per kv head
TINY_TIED = dataclasses.replace(TINY_GQA, tie_embeddings=True)


def nxd_layer_shapes(arch: Architecture, tp: int, kv_rep: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the NxD layers the backend builds, from NxD's own size
    rules (v2.28.0: ParallelEmbedding and ColumnParallelLinear split rows, RowParallelLinear
    columns; GQAQKVColumnParallelLinear holds q_dim / tp and kv_dim x kv_size_multiplier / tp
    rows, qkv_linear.py lines 449-450)."""
    h, q, kv, i, v = (
        arch.hidden_size, arch.num_heads * arch.head_dim, arch.kv_dim, arch.intermediate_size,
        arch.vocab_size,
    )  # fmt: skip
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v // tp, h)}
    for layer in range(arch.num_layers):
        p = f"layers.{layer}."
        if kv_rep > 1:
            shapes[p + "attention.qkv_proj.weight_q"] = (q // tp, h)
            shapes[p + "attention.qkv_proj.weight_k"] = (kv * kv_rep // tp, h)
            shapes[p + "attention.qkv_proj.weight_v"] = (kv * kv_rep // tp, h)
        else:
            shapes[p + "attention.wq.weight"] = (q // tp, h)
            shapes[p + "attention.wk.weight"] = (kv // tp, h)
            shapes[p + "attention.wv.weight"] = (kv // tp, h)
        shapes[p + "attention.wo.weight"] = (h, q // tp)
        shapes[p + "feed_forward.w1.weight"] = (i // tp, h)
        shapes[p + "feed_forward.w3.weight"] = (i // tp, h)
        shapes[p + "feed_forward.w2.weight"] = (h, i // tp)
        shapes[p + "attention_norm.weight"] = (h,)
        shapes[p + "ffn_norm.weight"] = (h,)
    shapes["norm.weight"] = (h,)
    if not arch.tie_embeddings:
        shapes["output.weight"] = (v // tp, h)
    return shapes


CHECKPOINTED = "_checkpoint_wrapped_module."


class FakeNxDModel(nn.Module):
    """What pretrained import sees of NxD's ``NxDModel``: the converted model behind
    ``original_module()``; layer 0 inside torch's checkpoint wrapper, as NxD's activation
    checkpointing leaves it."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], shards: RankShards) -> None:
        super().__init__()
        self.module = nn.Module()
        for name, shape in shapes.items():
            path = name.replace("layers.0.", "layers.0." + CHECKPOINTED).split(".")
            owner = self.module
            for part in path[:-1]:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(path[-1], nn.Parameter(torch.full(shape, float("nan"))))
        self.module.rank_shards = shards

    def original_module(self) -> nn.Module:
        return self.module

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        # NxDModel names parameters as the model it wraps does.
        return self.module.named_parameters(*args, **kwargs)

    def state(self) -> dict[str, Tensor]:
        """Its state dict as NxD saves it (the wrapper's hook strips the prefix)."""
        return {n.replace(CHECKPOINTED, ""): p.detach() for n, p in self.named_parameters()}


def write_hf_dir(root: Path, arch: Architecture, hf_sd: dict[str, Tensor]) -> Path:
    """HF safetensors in two files with an index, as large checkpoints come."""
    root.mkdir()
    keys = sorted(hf_sd)
    files = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors":
             keys[1::2]}  # fmt: skip
    for file, names in files.items():
        save_file({k: hf_sd[k].contiguous() for k in names}, str(root / file))
    index = {"weight_map": {k: file for file, names in files.items() for k in names}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps(hf_config(arch, "bfloat16")))
    return root


@pytest.mark.parametrize(
    ("arch", "tp", "kv_rep", "platform"),
    [
        (TINY_GQA, 4, 2, "trn1"),
        (TINY_GQA, 4, 2, "trn2"),
        (TINY_GQA, 8, 4, "trn1"),
        (TINY_TIED, 4, 2, "trn1"),
        (TINY_GQA, 2, 1, None),
    ],
    ids=["trn1-kv2", "trn2-kv2", "trn1-kv4", "tied", "no-replication"],
)
def test_pretrained_shards_fit_nxds_layers_and_export_round_trips(
    tmp_path: Path, arch: Architecture, tp: int, kv_rep: int, platform: str | None
) -> None:
    plan = ShardPlan(arch, tp, kv_rep, platform)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    full = {
        fqn: torch.randn(plan.full_shape(fqn), generator=gen).to(torch.bfloat16)
        for fqn in plan.fqns()
    }
    if arch.tie_embeddings:
        full["output.weight"] = full["tok_embeddings.weight"]
    hf_sd = to_hf_state_dict(full, arch)
    root = write_hf_dir(tmp_path / "hf", arch, hf_sd)

    shapes = nxd_layer_shapes(arch, tp, kv_rep)
    states = []
    for rank in range(tp):
        shards = RankShards(plan, rank)
        model = FakeNxDModel(shapes, shards)
        assert apply_pretrained([model], root, arch) == len(shapes)
        state = model.state()
        assert {n: tuple(t.shape) for n, t in state.items()} == shapes
        for name, value in state.items():
            fqn = plan.fqn_of(name)
            assert torch.equal(value, shards.take(fqn, full[fqn]).float()), (rank, name)

        # A full state dict in memory cuts to the same shards.
        again = FakeNxDModel(shapes, shards)
        apply_full_state_dict([again], load_pretrained(root, arch))
        assert all(torch.equal(state[n], t) for n, t in again.state().items())
        states.append(state)

    exported = hf_state_dict_from_nxd(plan, states, torch.bfloat16)
    assert exported.keys() == hf_sd.keys()
    assert all(torch.equal(exported[k], hf_sd[k]) for k in hf_sd)

    if kv_rep > 1:
        # Another rank holding rank 0's kv heads: their copies must agree on export.
        holder = next(r for r in range(1, tp) if plan.kv_heads(r) == plan.kv_heads(0))
        states[holder]["layers.0.attention.qkv_proj.weight_v"][0, 0] += 1
        with pytest.raises(CheckpointError, match="differ"):
            hf_state_dict_from_nxd(plan, states)


def test_torch_backend_parts_still_load_full_tensors(tmp_path: Path) -> None:
    from llamajob_trainer.model import Llama

    model = Llama(TINY_GQA)
    model.init_weights(5)
    root = write_hf_dir(tmp_path / "hf", TINY_GQA, to_hf_state_dict(model.state_dict(), TINY_GQA))
    fresh = Llama(TINY_GQA)
    assert apply_pretrained([fresh], root, TINY_GQA) == len(fresh.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_pretrained_missing_a_tensor_is_a_config_error(tmp_path: Path) -> None:
    plan = ShardPlan(TINY_GQA, 4, 2, "trn1")
    full = {fqn: torch.zeros(plan.full_shape(fqn)) for fqn in plan.fqns()}
    hf_sd = to_hf_state_dict(full, TINY_GQA)
    del hf_sd["model.layers.1.self_attn.k_proj.weight"]
    root = write_hf_dir(tmp_path / "hf", TINY_GQA, hf_sd)
    model = FakeNxDModel(nxd_layer_shapes(TINY_GQA, 4, 2), RankShards(plan, 0))
    with pytest.raises(ConfigError, match="lack"):
        apply_pretrained([model], root, TINY_GQA)
