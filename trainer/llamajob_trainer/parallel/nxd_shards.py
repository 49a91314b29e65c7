"""Tensor-parallel shard maps of the nxd backend: which rows or columns of every full parameter a
tensor-parallel rank holds, cutting a rank's shard out of the full tensor, and putting the full
tensor back together from every rank's shard.

Pure (ints and torch tensors; no NxD, no torch-xla), so that it is tested on any machine. One
map serves every user: the backend fills NxD's layers from it (fresh start), pretrained import
cuts the same shards from Hugging Face files, and export reassembles from it.

The arrangement is NxD's, read in aws-neuron/neuronx-distributed at tag v2.28.0 (commit 22cadad,
neuronx-distributed 0.17, the Neuron 2.28 release the trn1 image pins):

- ``ParallelEmbedding`` (vocabulary rows), ``ColumnParallelLinear`` (output rows: lm head, w1,
  w3, and q/k/v without kv replication) and ``RowParallelLinear`` (input columns: wo, w2) give
  rank r the r-th contiguous block (``parallel_layers/layers.py``, ``create_local_weight`` with
  stride 1; ``parallel_layers/utils.py``, ``EmbeddingUtility``). Norm weights are whole on
  every rank.
- With ``kvReplicator`` m > 1, ``GQAQKVColumnParallelLinear(kv_size_multiplier=m)`` copies the
  n kv heads into n*m slots and gives rank r the contiguous run of n*m/tp slots starting at
  r*n*m/tp. The slot order is the platform's (``modules/qkv_linear.py``,
  ``_initialize_affine_weight``, lines 79-88): trn1 ``repeat`` (K0..Kn-1, K0..Kn-1, ...), trn2
  ``repeat_interleave`` (K0 m times, K1 m times, ...). It is not ours to choose: backward sums
  the kv gradients over NxD's kv-shared groups (``modules/qkv_linear_utils.py`` lines 125-141),
  and only in this order are the ranks of a group (``parallel_layers/parallel_state.py``,
  ``arrange_kv_groups``, lines 1605-1645: ranks j, j+tp/m, ... on trn1; m consecutive ranks on
  trn2) the ones holding the same kv head.
- Each copy of kv head h serves its equal share of h's q heads: copy c serves the g/m heads from
  h*g + c*g/m (g = q heads per kv head). A rank's q rows are the q heads of its slots in slot
  order, because the rank-local attention gives local q head i the local kv head
  i // (local q heads / local kv heads) (``repeat_kv`` in NxD's Llama example,
  ``examples/training/llama/modeling_llama_nxd.py`` lines 438-439; SDPA's ``enable_gqa`` here).
  wo's input columns follow the same q heads in the same order, so the tensor-parallel model is
  the unsharded one. This is what NxD's own Hugging Face converter does
  (``scripts/checkpoint_converter.py``, ``convert_full_state_to_tp``, lines 583-652: on trn1 q
  is reordered Q0,Q4,... and o_proj "shuffled" the same way; on trn2 both stay contiguous). Its
  k/v cut there (line 568) uses the trn1 order on trn2 as well, which disagrees with the layer's
  own trn2 initialisation and kv groups; this module follows the layer and the groups.

NxD's converter handles one slot per rank (n*m = tp) only; on trn1 this module also handles
several (each rank then holds consecutive kv heads, as ``repeat`` and the contiguous split put
them). On trn2 the kv groups assume one kv head per rank, so n*m must equal tp there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..presets import Architecture
from .layout import LayoutError

Platform = Literal["trn1", "trn2"]
PLATFORMS: tuple[Platform, ...] = ("trn1", "trn2")

# Parameter FQNs under the model's own names (``model.Llama``), by how tensor parallel cuts them.
_VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")
_LAYER_KINDS = {
    "attention.wq.weight": "q",
    "attention.wk.weight": "kv",
    "attention.wv.weight": "kv",
    "attention.wo.weight": "o",
    "feed_forward.w1.weight": "ffn_rows",
    "feed_forward.w3.weight": "ffn_rows",
    "feed_forward.w2.weight": "ffn_columns",
    "attention_norm.weight": "whole",
    "ffn_norm.weight": "whole",
}
# NxD's GQA layer holds q, k and v as three parameters of one module (``fuse_qkv=False``).
_GQA_NAMES = {
    "attention.wq.weight": "attention.qkv_proj.weight_q",
    "attention.wk.weight": "attention.qkv_proj.weight_k",
    "attention.wv.weight": "attention.qkv_proj.weight_v",
}
_GQA_FQNS = {local: fqn for fqn, local in _GQA_NAMES.items()}


class ShardMismatch(ValueError):
    """Shards that do not make one full tensor: wrong shape, or copies that disagree."""


def platform_named(name: str) -> Platform:
    """The platform named as NxD's ``hardware`` enum values name it ("trn1", "trn2")."""
    for platform in PLATFORMS:
        if name == platform:
            return platform
    raise LayoutError(
        f"parallelism.kvReplicator > 1 needs trn1 or trn2, where NxD defines where the kv "
        f"copies go; this is {name!r}"
    )


@dataclass(frozen=True)
class Cut:
    """A rank's shard of one full parameter: the ``[start, stop)`` spans of ``dim`` it holds,
    laid end to end in this order."""

    dim: int
    spans: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(stop - start for start, stop in self.spans)

    def take(self, full: Tensor) -> Tensor:
        pieces = [full.narrow(self.dim, start, stop - start) for start, stop in self.spans]
        # One span stays a view, so filling a parameter from it never makes a second copy.
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


def _kind(fqn: str) -> str:
    if fqn in _VOCAB_ROWS:
        return "vocab"
    if fqn == "norm.weight":
        return "whole"
    parts = fqn.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        kind = _LAYER_KINDS.get(parts[2])
        if kind is not None:
            return kind
    raise KeyError(f"not a Llama parameter name: {fqn!r}")


def _head_spans(heads: Iterable[int], head_dim: int) -> tuple[tuple[int, int], ...]:
    spans: list[tuple[int, int]] = []
    for head in heads:
        start, stop = head * head_dim, (head + 1) * head_dim
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], stop)
        else:
            spans.append((start, stop))
    return tuple(spans)


@dataclass(frozen=True)
class ShardPlan:
    """How NxD shards ``arch`` over ``tp`` tensor-parallel ranks. ``platform`` decides where kv
    copies go and is needed only with ``kv_replicator > 1``."""

    arch: Architecture
    tp: int
    kv_replicator: int = 1
    platform: Platform | None = None

    def __post_init__(self) -> None:
        a, tp, m = self.arch, self.tp, self.kv_replicator
        if tp < 1 or m < 1:
            raise LayoutError(f"parallelism.tensor ({tp}) and kvReplicator ({m}) must be >= 1")
        sizes = {
            "model.numHeads": a.num_heads,
            "model.intermediateSize": a.intermediate_size,
            "model.vocabSize": a.vocab_size,
        }
        for name, value in sizes.items():
            if value % tp:
                raise LayoutError(f"parallelism.tensor ({tp}) must divide {name} ({value})")
        if a.num_heads % a.num_kv_heads:
            raise LayoutError(
                f"model.numKvHeads ({a.num_kv_heads}) must divide model.numHeads ({a.num_heads})"
            )
        if (a.num_kv_heads * m) % tp:
            raise LayoutError(
                f"parallelism.tensor ({tp}) must divide model.numKvHeads x "
                f"parallelism.kvReplicator = {a.num_kv_heads} x {m}"
            )
        if m == 1:
            return
        if tp % m:
            # NxD asserts it (GQAQKVColumnParallelLinear, kv-shared groups).
            raise LayoutError(
                f"parallelism.kvReplicator ({m}) must divide parallelism.tensor ({tp})"
            )
        group = a.num_heads // a.num_kv_heads
        if group % m:
            raise LayoutError(
                f"parallelism.kvReplicator ({m}) must divide the query heads per kv head "
                f"({group}): each kv copy serves an equal share of them"
            )
        if self.platform not in PLATFORMS:
            raise LayoutError(
                f"parallelism.kvReplicator > 1 needs the platform (trn1 or trn2), got "
                f"{self.platform!r}"
            )
        if self.platform == "trn2" and a.num_kv_heads * m != tp:
            hint = f"; set it to {tp // a.num_kv_heads}" if tp % a.num_kv_heads == 0 else ""
            raise LayoutError(
                f"on trn2 NxD's kv-shared groups hold one kv head per rank: model.numKvHeads x "
                f"parallelism.kvReplicator ({a.num_kv_heads} x {m}) must equal "
                f"parallelism.tensor ({tp}){hint}"
            )

    # --- heads ----------------------------------------------------------------------------

    @property
    def replicated_kv(self) -> bool:
        """Whether q/k/v are NxD's GQA layer (``kvReplicator > 1``) rather than three
        column-parallel layers."""
        return self.kv_replicator > 1

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.tp:
            raise ValueError(f"tensor-parallel rank {rank} is outside 0..{self.tp - 1}")

    def _slot(self, slot: int) -> tuple[int, int]:
        """(kv head, copy) in kv slot ``slot``."""
        if self.platform == "trn2":
            return divmod(slot, self.kv_replicator)
        copy, head = divmod(slot, self.arch.num_kv_heads)
        return head, copy

    def _slots(self, rank: int) -> range:
        self._check_rank(rank)
        per_rank = self.arch.num_kv_heads * self.kv_replicator // self.tp
        return range(rank * per_rank, (rank + 1) * per_rank)

    def kv_heads(self, rank: int) -> list[int]:
        """The kv heads of ``rank``, in its local order."""
        return [self._slot(slot)[0] for slot in self._slots(rank)]

    def q_heads(self, rank: int) -> list[int]:
        """The q heads of ``rank``, in its local order: each local kv head's share, in turn."""
        a = self.arch
        group = a.num_heads // a.num_kv_heads
        per_copy = group // self.kv_replicator
        heads: list[int] = []
        for slot in self._slots(rank):
            head, copy = self._slot(slot)
            first = head * group + copy * per_copy
            heads.extend(range(first, first + per_copy))
        return heads

    # --- parameters -----------------------------------------------------------------------

    def fqns(self) -> Iterator[str]:
        """Every distinct parameter of the model (a tied lm head is the embedding)."""
        yield "tok_embeddings.weight"
        for idx in range(self.arch.num_layers):
            for rest in _LAYER_KINDS:
                yield f"layers.{idx}.{rest}"
        yield "norm.weight"
        if not self.arch.tie_embeddings:
            yield "output.weight"

    def full_shape(self, fqn: str) -> tuple[int, ...]:
        a = self.arch
        h, q_dim = a.hidden_size, a.num_heads * a.head_dim
        kind = _kind(fqn)
        if kind == "vocab":
            return (a.vocab_size, h)
        if kind == "whole":
            return (h,)
        if kind == "kv":
            return (a.kv_dim, h)
        if kind == "ffn_rows":
            return (a.intermediate_size, h)
        if kind == "ffn_columns":
            return (h, a.intermediate_size)
        return (q_dim, h) if kind == "q" else (h, q_dim)

    def local_name(self, fqn: str) -> str:
        """The name of the NxD layer's parameter that holds ``fqn``'s shard."""
        if _kind(fqn) in ("q", "kv") and self.replicated_kv:
            prefix, _, rest = fqn.rpartition("attention.")
            return prefix + _GQA_NAMES["attention." + rest]
        return fqn

    def fqn_of(self, local_name: str) -> str:
        """The model's name of the parameter an NxD layer holds as ``local_name``."""
        if self.replicated_kv:
            prefix, _, rest = local_name.rpartition("attention.")
            fqn = _GQA_FQNS.get("attention." + rest)
            if prefix and fqn is not None:
                return prefix + fqn
            if _kind(local_name) in ("q", "kv"):
                raise KeyError(f"with kvReplicator > 1 qkv_proj holds {local_name!r}")
        _kind(local_name)
        return local_name

    def cut(self, fqn: str, rank: int) -> Cut:
        """What ``rank`` holds of ``fqn``."""
        self._check_rank(rank)
        shape = self.full_shape(fqn)
        kind = _kind(fqn)
        hd = self.arch.head_dim
        if kind == "whole":
            return Cut(0, ((0, shape[0]),))
        if kind == "q":
            return Cut(0, _head_spans(self.q_heads(rank), hd))
        if kind == "kv":
            return Cut(0, _head_spans(self.kv_heads(rank), hd))
        if kind == "o":
            return Cut(1, _head_spans(self.q_heads(rank), hd))
        dim = 1 if kind == "ffn_columns" else 0
        n = shape[dim] // self.tp
        return Cut(dim, ((rank * n, (rank + 1) * n),))

    def shard_shape(self, fqn: str, rank: int) -> tuple[int, ...]:
        cut = self.cut(fqn, rank)
        shape = list(self.full_shape(fqn))
        shape[cut.dim] = cut.length
        return tuple(shape)

    def shard(self, fqn: str, full: Tensor, rank: int) -> Tensor:
        """``rank``'s shard of the full tensor ``full`` (a view when it is one block)."""
        if tuple(full.shape) != self.full_shape(fqn):
            raise ShardMismatch(
                f"{fqn} is {tuple(full.shape)}, the model's is {self.full_shape(fqn)}"
            )
        return self.cut(fqn, rank).take(full)

    def assemble(self, fqn: str, shards: Iterable[Tensor]) -> Tensor:
        """The full tensor from every rank's shard, in rank order (an iterator may load them one
        at a time). Parts held by several ranks (kv copies, norms) must agree exactly: their
        gradients are summed over the same ranks, so any difference means a broken run."""
        shape = self.full_shape(fqn)
        out: Tensor | None = None
        owner: dict[tuple[int, int], int] = {}
        rank = -1
        for rank, shard in enumerate(shards):
            if rank >= self.tp:
                raise ShardMismatch(f"{fqn}: more than {self.tp} shards")
            cut = self.cut(fqn, rank)
            want = self.shard_shape(fqn, rank)
            if tuple(shard.shape) != want:
                raise ShardMismatch(
                    f"{fqn}: rank {rank}'s shard is {tuple(shard.shape)}, expected {want}"
                )
            if out is None:
                out = torch.empty(shape, dtype=shard.dtype)
            offset = 0
            for span in cut.spans:
                start, stop = span
                piece = shard.narrow(cut.dim, offset, stop - start)
                offset += stop - start
                if span in owner:
                    if not torch.equal(out.narrow(cut.dim, start, stop - start), piece):
                        raise ShardMismatch(
                            f"{fqn}: the copies of [{start}, {stop}) on ranks {owner[span]} and "
                            f"{rank} differ"
                        )
                    continue
                out.narrow(cut.dim, start, stop - start).copy_(piece)
                owner[span] = rank
        if out is None or rank != self.tp - 1:
            raise ShardMismatch(f"{fqn}: {rank + 1} shards, expected {self.tp}")
        covered = sum(stop - start for start, stop in owner)
        if covered != shape[self.cut(fqn, 0).dim]:
            raise ShardMismatch(f"{fqn}: the shards cover {covered} of {shape} along one dim")
        return out


@dataclass(frozen=True)
class RankShards:
    """One tensor-parallel rank's view of a ``ShardPlan``."""

    plan: ShardPlan
    rank: int

    def __post_init__(self) -> None:
        self.plan._check_rank(self.rank)

    def cut(self, fqn: str) -> Cut:
        return self.plan.cut(fqn, self.rank)

    def shape(self, fqn: str) -> tuple[int, ...]:
        return self.plan.shard_shape(fqn, self.rank)

    def take(self, fqn: str, full: Tensor) -> Tensor:
        return self.plan.shard(fqn, full, self.rank)
