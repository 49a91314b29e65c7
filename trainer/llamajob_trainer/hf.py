"""Hugging Face safetensors: import `model.pretrained` weights, export checkpoints.

Import (continual pre-training) reads `model.safetensors` or the shards listed in
`model.safetensors.index.json`, checks `config.json` against the job's architecture, renames to
our FQNs (`model.from_hf_state_dict`) and hands every model part the tensors it owns.

- torch backend: `set_model_state_dict(full_state_dict=True)` cuts them into this rank's
  TP/FSDP shards. Each rank reads through memory maps but materialises the full tensors of its
  own pipeline stage before sharding; for 70B-class models give the host memory for that, or
  convert the weights to a checkpoint once and resume from it.
- nxd backend (`apply_pretrained`): NxD's layers are already cut, so each rank reads only the
  rows or columns its parameters hold (`parallel.nxd_shards`, GQA kv copies included), one
  tensor at a time, straight from the memory-mapped files.

Export turns a complete checkpoint into `model.safetensors` + `config.json` that
`transformers.LlamaForCausalLM.from_pretrained` loads, in one process, without a process group.
`hf_state_dict_from_nxd` reassembles the full tensors from every tensor-parallel rank's NxD
state for it; an nxd-backend checkpoint is read and written one pipeline stage at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from .errors import CheckpointError, ConfigError
from .parallel.nxd_shards import RankShards, ShardMismatch, ShardPlan
from .presets import Architecture

if TYPE_CHECKING:
    from .checkpoint_nxd import NxDLayout, NxDModelFiles

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


def _pretrained_root(path: str | Path, arch: Architecture) -> Path:
    """The HF directory, its `config.json` (when present) checked against `arch`."""
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
    return root


def load_pretrained(path: str | Path, arch: Architecture) -> dict[str, Tensor]:
    """All weights of a HF Llama directory under our FQNs, checked against `arch`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import from_hf_state_dict

    root = _pretrained_root(path, arch)
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
        shards = rank_shards_of(part)
        if shards is not None:
            applied += _fill_shards(part, shards, sd.keys(), _cutter(sd, shards))
            continue
        wanted = get_model_state_dict(part).keys()
        missing = [k for k in wanted if k not in sd]
        if missing:
            raise ConfigError(f"model.pretrained lacks {len(missing)} tensors, e.g. {missing[:3]}")
        mine = {k: sd[k].to(torch.float32) for k in wanted}
        set_model_state_dict(part, mine, options=StateDictOptions(full_state_dict=True))
        applied += len(mine)
    return applied


# --- nxd backend: tensor-parallel shards -------------------------------------------------------


def rank_shards_of(part: nn.Module) -> RankShards | None:
    """The shard map the nxd backend left on its model, None for a torch-backend part.

    NxD's wrapper (``NxDModel``) hands back the model it wraps through ``original_module()``,
    pipeline-parallel or not.
    """
    original = getattr(part, "original_module", None)
    root = original() if callable(original) else part
    shards = getattr(root, "rank_shards", None)
    return shards if isinstance(shards, RankShards) else None


def _local_parameters(part: nn.Module, shards: RankShards) -> Iterator[tuple[str, nn.Parameter]]:
    """(our FQN, parameter) of every parameter the part holds on this rank."""
    for name, param in part.named_parameters():
        # NxD wraps checkpointed blocks in torch's checkpoint wrapper, which adds this to the
        # parameter names (its state dict hook removes it again, named_parameters does not).
        yield shards.plan.fqn_of(name.replace(_CHECKPOINT_PREFIX, "")), param


def _fill_shards(
    part: nn.Module,
    shards: RankShards,
    available: Collection[str],
    read: Callable[[str], Tensor],
) -> int:
    params = list(_local_parameters(part, shards))
    missing = [fqn for fqn, _ in params if fqn not in available]
    if missing:
        raise ConfigError(f"model.pretrained lacks {len(missing)} tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for fqn, param in params:
            value = read(fqn)
            if tuple(value.shape) != tuple(param.shape):
                raise RuntimeError(
                    f"{fqn}: this rank's shard is {tuple(value.shape)}, the NxD layer holds "
                    f"{tuple(param.shape)}"
                )
            param.copy_(value)
    return len(params)


def _cutter(sd: Mapping[str, Tensor], shards: RankShards) -> Callable[[str], Tensor]:
    def read(fqn: str) -> Tensor:
        try:
            return shards.take(fqn, sd[fqn])
        except ShardMismatch as exc:
            raise ConfigError(f"model.pretrained: {exc}") from exc

    return read


class _PretrainedSlices:
    """A HF directory opened for reading parts of tensors: the memory maps stay open, and a
    rank reads the rows or columns it holds without materialising the rest."""

    def __init__(self, path: str | Path, arch: Architecture) -> None:
        self.root = _pretrained_root(path, arch)
        self.arch = arch
        self._stack = ExitStack()
        self._where: dict[str, tuple[Any, str]] = {}

    def __enter__(self) -> _PretrainedSlices:
        from safetensors import SafetensorError, safe_open

        from .model import from_hf_state_dict

        with ExitStack() as stack:
            handles: dict[str, Any] = {}
            for file in _weight_files(self.root):
                try:
                    handle = stack.enter_context(safe_open(str(file), framework="pt"))
                except (OSError, SafetensorError) as exc:
                    raise ConfigError(f"model.pretrained: cannot read {file}: {exc}") from exc
                handles.update(dict.fromkeys(handle.keys(), handle))
            try:
                # The conversion only renames, so applied to the names it maps each FQN to its
                # HF name, with the checks (unexpected, missing, tied head) of a full load.
                names = from_hf_state_dict(
                    cast(dict[str, Tensor], {k: k for k in handles}), self.arch
                )
            except KeyError as exc:
                raise ConfigError(f"model.pretrained ({self.root}): {exc.args[0]}") from exc
            self._where = {fqn: (handles[str(key)], str(key)) for fqn, key in names.items()}
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def names(self) -> Collection[str]:
        return self._where.keys()

    def read(self, fqn: str, shards: RankShards) -> Tensor:
        handle, key = self._where[fqn]
        tensor = handle.get_slice(key)
        shape, want = tuple(tensor.get_shape()), shards.plan.full_shape(fqn)
        if shape != want:
            raise ConfigError(f"model.pretrained: {key} is {shape}, the job's model has {want}")
        cut = shards.cut(fqn)
        pieces = [
            tensor[start:stop] if cut.dim == 0 else tensor[:, start:stop]
            for start, stop in cut.spans
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=cut.dim)


def apply_pretrained(model_parts: Sequence[nn.Module], path: str | Path, arch: Architecture) -> int:
    """Load `model.pretrained` into the model parts; returns tensors applied.

    On the torch backend this is `apply_full_state_dict(load_pretrained(...))`. On the nxd
    backend each rank reads only its own shard of one tensor at a time, so host memory holds a
    shard, not the model (every rank of a node reads the same files through the page cache).
    """
    all_shards = [rank_shards_of(part) for part in model_parts]
    if not any(all_shards):
        return apply_full_state_dict(model_parts, load_pretrained(path, arch))
    applied = 0
    with _PretrainedSlices(path, arch) as source:
        for part, shards in zip(model_parts, all_shards, strict=True):
            if shards is None:
                raise RuntimeError("model parts of both backends in one model")
            applied += _fill_shards(part, shards, source.names, partial(source.read, shards=shards))
    return applied


def hf_state_dict_from_nxd(
    plan: ShardPlan,
    rank_states: Sequence[Mapping[str, Tensor]],
    dtype: torch.dtype = torch.float32,
    fqns: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """HF-named full tensors from every tensor-parallel rank's model state.

    ``rank_states[r]`` holds rank r's parameters under the NxD layers' names (a rank's pipeline
    stages merged, or one stage with ``fqns`` its parameters; default: the whole model); a
    lazily loading mapping keeps one parameter's shards in memory at a time. Parts held by
    several ranks (kv copies, norms) must be equal.
    """
    from .model import to_hf_state_dict

    if len(rank_states) != plan.tp:
        raise CheckpointError(f"{len(rank_states)} tensor-parallel states, expected {plan.tp}")

    def shards_of(local: str) -> Iterator[Tensor]:
        for rank, state in enumerate(rank_states):
            if local not in state:
                raise CheckpointError(f"tensor-parallel rank {rank}'s state lacks {local}")
            yield state[local]

    full: dict[str, Tensor] = {}
    for fqn in plan.fqns() if fqns is None else fqns:
        try:
            full[fqn] = plan.assemble(fqn, shards_of(plan.local_name(fqn))).to(dtype)
        except ShardMismatch as exc:
            raise CheckpointError(f"cannot reassemble the model: {exc}") from exc
    return {k: v.contiguous() for k, v in to_hf_state_dict(full, plan.arch).items()}


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
    platform: str | None = None,
) -> Path:
    """Write step N (None = newest complete) of `checkpoint_dir` as HF safetensors into out_dir.

    The checkpoint is verified first (digests of every file; a damaged one is refused and left
    in place). Either backend's checkpoint: the torch backend's DCP state is loaded whole; the
    nxd backend's per-rank NxD files are reassembled one pipeline stage at a time
    (`_export_nxd`). `platform` (trn1 or trn2) is where NxD put the kv copies, needed for an
    NxD checkpoint with kvReplicator > 1 unless the checkpoint records it.
    """
    from .checkpoint import (
        STATE_DIR,
        STATE_FORMAT,
        CheckpointManager,
        _single_process_ok,
        step_dir_name,
    )
    from .errors import CheckpointCorruptError

    manager = CheckpointManager(checkpoint_dir, keep=1 << 30, fingerprint=fingerprint)
    if step is None:
        step = manager.latest_complete_step()
        if step is None:
            raise CheckpointError(
                f"no complete checkpoint in {checkpoint_dir}; train first or fix --checkpoint-dir"
            )
    try:
        fmt = manager.read_trainer_state(step).get(STATE_FORMAT)
    except CheckpointCorruptError:
        fmt = None  # missing or unreadable: verify says which, for either format
    nxd = isinstance(fmt, dict) and fmt.get("name") == "nxd"
    if nxd:
        from .checkpoint_nxd import NxDModelFiles, nxd_layout_of

        reader = NxDModelFiles(nxd_layout_of({STATE_FORMAT: fmt}))
        manager = CheckpointManager(
            checkpoint_dir, keep=1 << 30, fingerprint=fingerprint, state_io=reader
        )
    manager.verify(step)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    state = Path(checkpoint_dir) / step_dir_name(step) / STATE_DIR
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if nxd:
        assert isinstance(fmt, dict)
        plan = _recorded_plan(arch, reader.layout, fmt, platform)
        _export_nxd(plan, reader, state, torch_dtype, out)
    else:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        from .model import Llama, to_hf_state_dict

        with torch.device("meta"):
            model = Llama(arch)
        model.to_empty(device="cpu")
        sd = get_model_state_dict(model)
        with _single_process_ok():
            dcp.load({"model": sd}, checkpoint_id=str(state), no_dist=True)
        hf_sd = {k: v.to(torch_dtype).contiguous() for k, v in to_hf_state_dict(sd, arch).items()}
        _remove_stale_weights(out)
        save_file(hf_sd, str(out / SAFETENSORS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(hf_config(arch, dtype), indent=2) + "\n")
    if tokenizer is not None:
        tok = Path(tokenizer)
        tok = tok / "tokenizer.json" if tok.is_dir() else tok
        shutil.copy(tok, out / "tokenizer.json")
    return out


def _remove_stale_weights(out: Path) -> None:
    """Weights of an earlier export into the same directory, in the other file layout: a loader
    finding both a single file and an index would have to guess which one is current."""
    for old in (out / SAFETENSORS, out / SAFETENSORS_INDEX, *out.glob("model-*-of-*.safetensors")):
        old.unlink(missing_ok=True)


def _recorded_plan(
    arch: Architecture, layout: NxDLayout, fmt: Mapping[str, Any], platform: str | None
) -> ShardPlan:
    """The shard map the nxd backend trained with (``neuron_backend._Converter``): the recorded
    tensor degree and kvReplicator, and with kv copies the platform that placed them."""
    from .parallel.layout import LayoutError
    from .parallel.nxd_shards import platform_named

    recorded = fmt.get("platform")
    if recorded is not None and platform is not None and recorded != platform:
        raise CheckpointError(
            f"--platform {platform} contradicts the checkpoint, written on {recorded}"
        )
    where = recorded if recorded is not None else platform
    try:
        if layout.kv_replicator > 1 and where is None:
            raise CheckpointError(
                f"the checkpoint has kvReplicator {layout.kv_replicator}: NxD places the kv "
                "copies differently on trn1 and trn2 and the checkpoint does not say which it "
                "was written on; pass --platform trn1 or --platform trn2"
            )
        chosen = platform_named(where) if layout.kv_replicator > 1 and where else None
        return ShardPlan(arch, layout.tp, layout.kv_replicator, chosen)
    except LayoutError as exc:
        raise CheckpointError(f"cannot reassemble the checkpoint for this model: {exc}") from None


class _TakeOnce(dict[str, Tensor]):
    """A rank's loaded state that lets go of each shard once read: ``hf_state_dict_from_nxd``
    reads every shard once, so a stage's shards shrink as its full tensors grow."""

    def __getitem__(self, key: str) -> Tensor:
        return self.pop(key)


def _export_nxd(
    plan: ShardPlan, reader: NxDModelFiles, state: Path, dtype: torch.dtype, out: Path
) -> list[Path]:
    """Reassemble an NxD checkpoint and write it as safetensors, one pipeline stage at a time.

    For each stage the model file of every tensor-parallel rank is read, in turn
    (``NxDModelFiles.load_model``), the full tensors of the stage's parameters put together by
    ``hf_state_dict_from_nxd`` (kv copies and norms checked to agree) and written as one shard:
    host memory holds one stage, not the model. One stage: ``model.safetensors``; several:
    ``model-0000S-of-0000P.safetensors`` and ``model.safetensors.index.json``, the layout
    ``transformers`` and ``model.pretrained`` read."""
    from safetensors.torch import save_file

    stages = reader.layout.pp
    names = (
        [SAFETENSORS] if stages == 1
        else [f"model-{s + 1:05d}-of-{stages:05d}.safetensors" for s in range(stages)]
    )
    wanted = list(plan.fqns())
    done: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    total = 0
    _remove_stale_weights(out)
    for pp, name in enumerate(names):
        rank_states = [_TakeOnce(reader.load_model(state, tp, pp)) for tp in range(plan.tp)]
        # A stage's parameters are the ones its files hold; a tied head's output.weight on the
        # last stage is the embedding's (plan.fqns() leaves it out).
        mine = [fqn for fqn in wanted if plan.local_name(fqn) in rank_states[0]]
        again = [fqn for fqn in mine if fqn in done]
        if again:
            raise CheckpointError(
                f"pipeline stages {done[again[0]]} and {pp} both hold {again[0]}"
            )
        done.update(dict.fromkeys(mine, pp))
        hf_sd = hf_state_dict_from_nxd(plan, rank_states, dtype, fqns=mine)
        del rank_states
        save_file(hf_sd, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(hf_sd, name))
        total += sum(t.numel() * t.element_size() for t in hf_sd.values())
        del hf_sd
    missing = [fqn for fqn in wanted if fqn not in done]
    if missing:
        raise CheckpointError(
            f"the checkpoint's model files lack {len(missing)} parameters, e.g. {missing[:3]}"
        )
    if stages > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [out / name for name in names]
