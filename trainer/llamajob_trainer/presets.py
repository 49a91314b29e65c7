"""Published Llama architectures. Pure data: no torch import.

Sources (architecture numbers and published parameter totals):
- Llama 2 (7B, 13B, 70B): Touvron et al. 2023, "Llama 2", Table 1 and the released HF
  ``config.json`` files (meta-llama/Llama-2-*-hf).
- Llama 3 / 3.1 (8B, 70B): "The Llama 3 Herd of Models" (Dubey et al. 2024), Table 3, and the
  HF ``config.json`` files (meta-llama/Meta-Llama-3-8B, Llama-3.1-70B, ...). 3.1 only raises the
  context length (rope scaling, which this trainer does not apply; see ``model.py``).
- Llama 3.2 (1B, 3B): the HF ``config.json`` files (meta-llama/Llama-3.2-1B, -3B).
  The FSDP tutorial's table lists intermediate_size 11008 for 3.2-3B; the released config says
  8192, which is the only value that reproduces the published 3.21B total, so we use 8192.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Architecture:
    """Every number the model needs. Overrides in the job spec produce a new instance."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int
    tie_embeddings: bool = False
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        attention = h * h * 2 + h * self.kv_dim * 2  # q, o and k, v projections
        mlp = 3 * h * i  # SwiGLU: gate, up, down
        norms = 2 * h
        return attention + mlp + norms

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        """Total parameters, embeddings included (the figure model cards publish)."""
        heads = 1 if self.tie_embeddings else 2
        final_norm = self.hidden_size
        return self.num_layers * self.layer_params() + heads * self.embedding_params() + final_norm

    def with_overrides(self, **overrides: object) -> Architecture:
        clean = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **clean) if clean else self


_LLAMA3_VOCAB = 128256
_LLAMA2_VOCAB = 32000

PRESETS: dict[str, Architecture] = {
    "llama2-7b": Architecture(4096, 32, 32, 32, 11008, _LLAMA2_VOCAB, 10000.0, 4096),
    "llama2-13b": Architecture(5120, 40, 40, 40, 13824, _LLAMA2_VOCAB, 10000.0, 4096),
    "llama2-70b": Architecture(8192, 80, 64, 8, 28672, _LLAMA2_VOCAB, 10000.0, 4096),
    "llama3-8b": Architecture(4096, 32, 32, 8, 14336, _LLAMA3_VOCAB, 500000.0, 8192),
    "llama3-70b": Architecture(8192, 80, 64, 8, 28672, _LLAMA3_VOCAB, 500000.0, 8192),
    "llama3.1-8b": Architecture(4096, 32, 32, 8, 14336, _LLAMA3_VOCAB, 500000.0, 131072),
    "llama3.1-70b": Architecture(8192, 80, 64, 8, 28672, _LLAMA3_VOCAB, 500000.0, 131072),
    "llama3.2-1b": Architecture(
        2048, 16, 32, 8, 8192, _LLAMA3_VOCAB, 500000.0, 131072, tie_embeddings=True
    ),
    "llama3.2-3b": Architecture(
        3072, 28, 24, 8, 8192, _LLAMA3_VOCAB, 500000.0, 131072, tie_embeddings=True
    ),
    # Small enough to train on two CPU processes in a few minutes, same architecture family.
    # The vocabulary covers the built-in byte-level tokenizer (256 bytes + specials), padded.
    "tiny": Architecture(128, 4, 4, 2, 384, 512, 10000.0, 1024),
}

# Totals as published (model cards / papers), used by the tests to pin the presets.
PUBLISHED_PARAMS: dict[str, float] = {
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.02e9,
    "llama2-70b": 68.98e9,
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.55e9,
    "llama3.1-8b": 8.03e9,
    "llama3.1-70b": 70.55e9,
    "llama3.2-1b": 1.24e9,
    "llama3.2-3b": 3.21e9,
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)
