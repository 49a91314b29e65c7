"""The Llama 3 model, written once for every backend and layout.

Parameter names (FQNs) are the checkpoint keys and never depend on the layout: tensor parallel
shards them in place, pipeline stages drop whole submodules (``tok_embeddings``, ``norm``,
``output`` become ``None``; layers not on the stage are deleted from ``layers``), FSDP wraps them
in place and activation checkpointing is a flag on each block, not a wrapper module.

RoPE follows the Hugging Face convention (rotate the two halves of each head), so weights map
to and from ``LlamaForCausalLM`` by renaming only, without permuting q/k rows.

Not implemented: the Llama 3.1 long-context RoPE scaling (``rope_scaling: llama3``). Positions
use plain RoPE with ``arch.rope_theta``; this is exact for Llama 3 / 3.2 at their trained
context and for training from scratch, but differs from 3.1 checkpoints beyond 8K positions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .cpu_linear import Linear
from .presets import Architecture

INIT_STD = 0.02
IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of shape [seq_len, head_dim // 2], float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [batch, heads, seq, head_dim] in the HF layout (first half, second half).

    Equivalent to HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` with half the
    multiplications and one allocation for the result.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.head_dim = arch.head_dim
        h = arch.hidden_size
        self.wq = Linear(h, arch.num_heads * self.head_dim, bias=False)
        self.wk = Linear(h, arch.kv_dim, bias=False)
        self.wv = Linear(h, arch.kv_dim, bias=False)
        self.wo = Linear(arch.num_heads * self.head_dim, h, bias=False)
        # Selective activation checkpointing: recompute the attention core (the s x s part)
        # in backward instead of keeping it. Set by the parallel backend, which may also swap
        # the recompute function (torch-xla has its own checkpoint; see neuron_backend).
        self.recompute_core = False
        self.recompute_fn: Callable[..., Tensor] = checkpoint_non_reentrant

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The q, k, v projections; a backend with a fused projection overrides this."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        q, k, v = self.project_qkv(x)
        # Shapes from the projections, not from x: under sequence parallel x holds a slice of
        # the sequence and the projection gathers it. -1 heads: each tensor-parallel rank
        # holds only its share of the heads.
        b, s, d = q.shape[0], q.shape[1], self.head_dim
        q = q.view(b, s, -1, d).transpose(1, 2)
        k = k.view(b, s, -1, d).transpose(1, 2)
        v = v.view(b, s, -1, d).transpose(1, 2)
        cos, sin = rope_cos[:s], rope_sin[:s]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.recompute_core and torch.is_grad_enabled():
            out = self.recompute_fn(_attention_core, q, k, v)
        else:
            out = _attention_core(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def checkpoint_non_reentrant(function: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """torch's activation checkpoint, non-reentrant: the recompute of every torch device."""
    return checkpoint(function, *args, use_reentrant=False)


# PyTorch's CPU flash kernel splits queries finely enough to skip the masked half of causal
# attention only from this length up; below it, it does the full square.
_CPU_FLASH_CAUSAL_SKIP_FROM = 768
# Smaller blocks skip more of the mask but run thinner matmuls; 32 and 64 measured alike on the
# benchmark's shapes, 16 slower.
_CAUSAL_BLOCK = 32


def _attention_core(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if (
        q.device.type == "cpu"
        and q.shape[-2] < _CPU_FLASH_CAUSAL_SKIP_FROM
        and torch.compiler.is_compiling()
    ):
        return block_causal_attention(q, k, v, _CAUSAL_BLOCK)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, block: int) -> Tensor:
    """Causal grouped-query attention from plain matmuls, skipping the masked blocks.

    q [b, heads, s, d], k and v [b, kv_heads, s, d]. Each block of ``block`` queries attends
    only to the keys up to its end, so about half of the s x s scores are never computed
    (the CPU flash kernel computes all of them below ``_CPU_FLASH_CAUSAL_SKIP_FROM``). The
    query heads that share a key head are stacked into one matmul, so k and v are never
    repeated. Meant to be traced by torch.compile, which fuses the mask and softmax; it keeps
    each block's probabilities for backward, which is why it is used only for short sequences.
    """
    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # Scaling q costs s x d multiplications; scaling the scores would cost s x s.
    grouped = (q * (1.0 / math.sqrt(d))).view(b, kv_heads, group, s, d)
    outs = []
    for start in range(0, s, block):
        end = min(start + block, s)
        rows = end - start
        qb = grouped[:, :, :, start:end].reshape(b, kv_heads, group * rows, d)
        scores = qb @ k[:, :, :end].transpose(-1, -2)
        row_pos = torch.arange(start, end, device=q.device, dtype=torch.int32)
        row_pos = row_pos.repeat(group).unsqueeze(-1)
        col_pos = torch.arange(end, device=q.device, dtype=torch.int32)
        scores = scores.masked_fill(col_pos > row_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        outs.append((probs @ v[:, :, :end]).view(b, kv_heads, group, rows, d))
    return torch.cat(outs, dim=3).view(b, heads, s, d)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.w1 = Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.w2 = Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.w3 = Linear(arch.hidden_size, arch.intermediate_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.attention = Attention(arch)
        self.ffn_norm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.feed_forward = FeedForward(arch)
        # Full activation checkpointing: keep only the block input, recompute the rest in
        # backward. A flag rather than a wrapper module so that FQNs stay the checkpoint keys.
        self.recompute = False

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, rope_cos, rope_sin, use_reentrant=False)
        return self._forward(x, rope_cos, rope_sin)

    def _forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope_cos, rope_sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Llama 3 decoder. ``forward(tokens[b, s]) -> logits[b, s, vocab]`` for the full model.

    A pipeline stage is the same class with parts removed: without ``tok_embeddings`` it takes
    hidden states, without ``output`` it returns hidden states.
    """

    def __init__(self, arch: Architecture, max_seq_len: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.max_seq_len = max_seq_len or arch.max_position_embeddings
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(arch) for i in range(arch.num_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.output: nn.Linear | None = Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(arch.head_dim, self.max_seq_len, arch.rope_theta)
        # Non-persistent: derived from the architecture, so not part of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h

    def tie_weights(self) -> None:
        """Re-establish the embedding/output tie (lost when a module is materialised)."""
        if self.arch.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init, independent of the layout.

        Every parameter draws from its own generator seeded by (seed, FQN), so a pipeline stage
        that holds only some layers gets exactly the values the full model would. Linear and
        embedding weights are N(0, 0.02); the projections that write into the residual stream
        (``wo``, ``w2``) are scaled by 1/sqrt(2 * num_layers) (GPT-2); norms are ones. Also
        recomputes the RoPE tables, so a model built on the meta device is complete after
        ``to_empty()`` and this call.
        """
        self.tie_weights()
        done: set[int] = set()
        for fqn, p in self.named_parameters(remove_duplicate=False):
            if id(p) not in done:
                done.add(id(p))
                p.copy_(init_tensor(self.arch, seed, fqn, tuple(p.shape)))
        cos, sin = rope_tables(self.arch.head_dim, self.max_seq_len, self.arch.rope_theta)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)


def init_tensor(arch: Architecture, seed: int, fqn: str, shape: tuple[int, ...]) -> Tensor:
    """The initial value of one parameter (float32, CPU), a pure function of (seed, FQN).

    Backends that build their own sharded layers take their slice of this tensor.
    """
    if fqn.endswith("norm.weight"):
        return torch.ones(shape)
    # A tied output weight on its own (last pipeline stage) must equal the embedding.
    key = "tok_embeddings.weight" if fqn == "output.weight" and arch.tie_embeddings else fqn
    std = INIT_STD
    if fqn.endswith(("wo.weight", "w2.weight")):
        std /= math.sqrt(2 * arch.num_layers)
    gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, key))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)


def _param_seed(seed: int, fqn: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63)


def loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed token cross-entropy in float32; labels equal to -100 are ignored."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


# --- Hugging Face name mapping ----------------------------------------------------------------
_HF_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _to_hf_key(key: str) -> str:
    if key in _HF_TOP:
        return _HF_TOP[key]
    _, idx, rest = key.split(".", 2)
    return f"model.layers.{idx}.{_HF_LAYER[rest]}"


def to_hf_state_dict(sd: Mapping[str, Tensor], arch: Architecture) -> dict[str, Tensor]:
    """Our FQNs -> ``LlamaForCausalLM`` names. Tied models omit ``lm_head.weight``, as HF's
    saved checkpoints do. No permutation is needed: our RoPE uses the HF layout."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "output.weight" and arch.tie_embeddings:
            continue
        try:
            out[_to_hf_key(key)] = value
        except (KeyError, ValueError):
            raise KeyError(f"not a Llama parameter name: {key!r}") from None
    return out


def from_hf_state_dict(hf_sd: Mapping[str, Tensor], arch: Architecture) -> dict[str, Tensor]:
    """``LlamaForCausalLM`` names -> our FQNs. Rotary buffers (``rotary_emb.inv_freq``) are
    skipped; a tied model's ``output.weight`` is the embedding."""
    reverse = {_to_hf_key(k): k for k in _our_keys(arch)}
    out: dict[str, Tensor] = {}
    for key, value in hf_sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and arch.tie_embeddings:
            continue
        if key not in reverse:
            raise KeyError(
                f"unexpected weight {key!r} for this architecture "
                f"({arch.num_layers} layers, tie_embeddings={arch.tie_embeddings})"
            )
        out[reverse[key]] = value
    missing = [reverse[k] for k in reverse if reverse[k] not in out]
    if arch.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
        missing = [k for k in missing if k != "output.weight"]
    if missing:
        raise KeyError(f"Hugging Face weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    return out


def _our_keys(arch: Architecture) -> list[str]:
    keys = list(_HF_TOP)
    keys += [f"layers.{i}.{rest}" for i in range(arch.num_layers) for rest in _HF_LAYER]
    return keys
