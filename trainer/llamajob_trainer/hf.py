"""Hugging Face safetensors: import `model.pretrained` weights, export checkpoints.

Import (continual pre-training) reads `model.safetensors` or the shards listed in
`model.safetensors.index.json`, checks `config.json` against the job's architecture, renames to
our FQNs (`model.from_hf_state_dict`) and hands every model part the tensors it owns;
`set_model_state_dict(full_state_dict=True)` cuts them into this rank's TP/FSDP shards. Each
rank reads through memory maps but materialises the full tensors of its own pipeline stage
before sharding; for 70B-class models give the host memory for that, or convert the weights to
a checkpoint once and resume from it.

Export turns a complete checkpoint into `model.safetensors` + `config.json` that
`transformers.LlamaForCausalLM.from_pretrained` loads, in one process, without a process group.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from .errors import CheckpointError, ConfigError
from .presets import Architecture

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


def hf_config(arch: Architecture, dtype: str, eos_token_id: int | None = None) -> dict[str, Any]:
    """A LlamaConfig for `arch` (pure)."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": arch.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def config_mismatches(config: dict[str, Any], arch: Architecture) -> list[str]:
    """Differences between a HF config.json and the job's architecture (pure)."""
    expected = {
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "intermediate_size": arch.intermediate_size,
        "vocab_size": arch.vocab_size,
    }
    problems = []
    for key, want in expected.items():
        have = config.get(key, arch.num_heads if key == "num_key_value_heads" else None)
        if have != want:
            problems.append(f"{key} is {have}, the job's model has {want}")
    tied = bool(config.get("tie_word_embeddings", False))
    if tied != arch.tie_embeddings:
        problems.append(f"tie_word_embeddings is {tied}, the job's model has {arch.tie_embeddings}")
    return problems


def _weight_files(root: Path) -> list[Path]:
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.pretrained: cannot read {index}: {exc}") from exc
        return [root / name for name in sorted(set(weight_map.values()))]
    single = root / SAFETENSORS
    if single.is_file():
        return [single]
    raise ConfigError(
        f"model.pretrained: {root} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX}; point it "
        "at a Hugging Face model directory with safetensors weights"
    )


def load_pretrained(path: str | Path, arch: Architecture) -> dict[str, Tensor]:
    """All weights of a HF Llama directory under our FQNs, checked against `arch`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import from_hf_state_dict

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model.pretrained: directory {root} does not exist")
    config_path = root / CONFIG
    if config_path.is_file():
        try:
            problems = config_mismatches(json.loads(config_path.read_text()), arch)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.pretrained: cannot read {config_path}: {exc}") from exc
        if problems:
            raise ConfigError(
                f"model.pretrained ({root}) does not match the job's model: "
                f"{'; '.join(problems)}. Choose the matching model.preset or overrides"
            )
    hf_sd: dict[str, Tensor] = {}
    for file in _weight_files(root):
        try:
            hf_sd.update(load_file(file))
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"model.pretrained: cannot read {file}: {exc}") from exc
    try:
        return from_hf_state_dict(hf_sd, arch)
    except KeyError as exc:
        raise ConfigError(f"model.pretrained ({root}): {exc.args[0]}") from exc


def apply_full_state_dict(model_parts: Sequence[nn.Module], sd: dict[str, Tensor]) -> int:
    """Copy full (unsharded) tensors into each part's shards; returns tensors applied."""
    applied = 0
    for part in model_parts:
        wanted = get_model_state_dict(part).keys()
        missing = [k for k in wanted if k not in sd]
        if missing:
            raise ConfigError(f"model.pretrained lacks {len(missing)} tensors, e.g. {missing[:3]}")
        mine = {k: sd[k].to(torch.float32) for k in wanted}
        set_model_state_dict(part, mine, options=StateDictOptions(full_state_dict=True))
        applied += len(mine)
    return applied


# --- export --------------------------------------------------------------------------------


def export_checkpoint(
    checkpoint_dir: str | Path,
    step: int | None,
    arch: Architecture,
    fingerprint: str,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> Path:
    """Write step N (None = newest complete) of `checkpoint_dir` as HF safetensors into out_dir."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from .checkpoint import STATE_DIR, CheckpointManager, _single_process_ok, step_dir_name
    from .model import Llama, to_hf_state_dict

    manager = CheckpointManager(checkpoint_dir, keep=1 << 30, fingerprint=fingerprint)
    if step is None:
        step = manager.latest_complete_step()
        if step is None:
            raise CheckpointError(
                f"no complete checkpoint in {checkpoint_dir}; train first or fix --checkpoint-dir"
            )
    manager.verify(step)
    with torch.device("meta"):
        model = Llama(arch)
    model.to_empty(device="cpu")
    sd = get_model_state_dict(model)
    path = Path(checkpoint_dir) / step_dir_name(step) / STATE_DIR
    with _single_process_ok():
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf_sd = {k: v.to(torch_dtype).contiguous() for k, v in to_hf_state_dict(sd, arch).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, str(out / SAFETENSORS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(hf_config(arch, dtype), indent=2) + "\n")
    if tokenizer is not None:
        tok = Path(tokenizer)
        tok = tok / "tokenizer.json" if tok.is_dir() else tok
        shutil.copy(tok, out / "tokenizer.json")
    return out
