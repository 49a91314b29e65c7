"""Trainer throughput and checkpoint-save benchmark (CPU).

1. Training step tokens/s of our Llama (through the torch backend's ParallelModel, a world of
   one) against Hugging Face ``LlamaForCausalLM`` with a minimal loop, on the same
   architecture, batch, threads and precision. Ours builds and steps its optimizer as the
   trainer does (fused AdamW); HF gets torch's fused AdamW too. Both clip the gradient norm.
   Ours runs eager, and with ``compile.torchCompile`` (each block compiled by Inductor, cold
   cache; the compile time is reported separately), both on the CPU matmul library the trainer
   picks by timing (``llamajob_trainer.cpu_linear``: oneDNN or ``torch.mm``, printed), and
   compiled again on the other library (``ours_compiled_onednn`` or ``ours_compiled_mm``: what
   the choice is worth on this CPU). HF and torchtitan run on ``torch.mm``, as any model of
   ``nn.Linear`` does. HF runs eager with its ``eager`` and ``sdpa`` attention. Steps of all
   contenders alternate, so load from other processes on the machine hits them alike; the
   median step time is reported.
   The headline figures (``tokens_per_second``, ``ratio_vs_hf``, ``ratio_vs_torchtitan``,
   ``mfu``) are the compiled run's unless ``--no-compile``; the eager run's are reported beside
   them.
   Second baseline, torchtitan (PyPI ``torchtitan`` 0.3.0): its own ``Llama3Model``
   (``torchtitan.models.llama3``) with the same architecture, threads and precision, the same
   minimal step as HF's (torchtitan's ``cross_entropy_loss`` over the tokens, backward,
   ``clip_grad_norm_`` with ``foreach`` as its trainer calls it, fused AdamW), eager
   (``titan``) and with each block compiled as its ``apply_compile`` does (``titan_compiled``).
   Its intermediate size is derived from ``ffn_dim_multiplier`` / ``multiple_of``, chosen to
   reproduce ours; the parameter counts are asserted equal. Its two attention backends for
   language models do not train on CPU (FlexAttention has no CPU backward, varlen calls the
   CUDA-only flash kernel); the benchmark tries both on the first layer and prints where each
   stops, then runs torchtitan's ``ScaledDotProductAttention`` inner attention (causal; exact
   here, every row is one document). Install it beside the trainer with::

       pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 tyro docstring_parser typeguard

   (``--no-deps``: its full requirements pin ``datasets<4.8``, which needs
   ``huggingface-hub<2`` while the HF baseline's ``transformers`` needs ``>=2.4``; the model
   needs none of the data-loading and logging packages.) Without it the report says
   ``torchtitan: unavailable (reason)`` and the rest runs as before.
2. MFU: model FLOPs per second (6 x matmul parameters x tokens + 12 x layers x hidden x seq per
   token for attention, the usual convention) over the fp32 matmul peak measured here (best of
   several large square matmuls with the same threads, on each library; the faster one's).
3. Checkpoint save seconds, 2 ranks with FSDP2 (a torchrun subprocess): the trainer's
   ``CheckpointManager.save`` (every rank writes its own shards with torch.distributed.checkpoint,
   then the done marker) against gathering the full model and optimizer state to rank 0 and
   ``torch.save`` there. Both fsync what they write.

Prints a readable report and, last, one JSON line. ``--quick`` runs a short version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from llamajob_trainer.cpu_linear import LIBRARY_NAMES
from llamajob_trainer.presets import Architecture

# The contender that runs the library the trainer did not choose.
ABLATION = {"onednn": "ours_compiled_onednn", "aten": "ours_compiled_mm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (fewer steps, smaller save)")
    p.add_argument("--hidden", type=int, default=None, help="default 1024 (--quick: 512)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=None, help="default hidden / 64")
    p.add_argument("--kv-heads", type=int, default=None, help="default heads / 4")
    p.add_argument("--intermediate", type=int, default=None, help="default: 3 x hidden")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default 512 (--quick: 256)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model")
    p.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads for every measurement (default 1: per-core figures stay "
        "meaningful on a machine shared with other work; raise it on a dedicated one)",
    )
    p.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="fp32")
    p.add_argument("--no-compile", action="store_true", help="skip the torchCompile run")
    p.add_argument("--no-torchtitan", action="store_true", help="skip the torchtitan baseline")
    p.add_argument("--skip-checkpoint", action="store_true")
    p.add_argument("--checkpoint-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.hidden = args.hidden or (512 if args.quick else 1024)
    args.heads = args.heads or max(1, args.hidden // 64)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    args.seq = args.seq or (256 if args.quick else 512)
    return args


def arch_from(args: argparse.Namespace) -> Architecture:
    return Architecture(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate or 3 * args.hidden,
        vocab_size=args.vocab,
        rope_theta=500000.0,
        max_position_embeddings=max(args.seq, 2048),
    )


# --- FLOPs and peak ---------------------------------------------------------------------------
def flops_per_token(arch: Architecture, seq: int) -> float:
    """Training FLOPs per token: 6 x parameters that take part in matmuls (not the embedding
    lookup, not norms) + attention scores and values, 12 x layers x hidden x seq."""
    matmul_params = arch.num_layers * (arch.layer_params() - 2 * arch.hidden_size)
    matmul_params += arch.embedding_params()  # the output projection
    return 6 * matmul_params + 12 * arch.num_layers * arch.hidden_size * seq


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> dict[str, float]:
    """GFLOP/s of each CPU matmul library (the trainer's own measurement, larger matrices)."""
    from llamajob_trainer.metrics import cpu_matmul_peaks

    return {name: flops / 1e9 for name, flops in cpu_matmul_peaks(n, reps, dtype).items()}


# --- training steps ---------------------------------------------------------------------------
def make_adamw(params: Any) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4)


def our_step(
    arch: Architecture, args: argparse.Namespace, compile_cache: str | None = None,
    library: str | None = None,
) -> tuple[Callable[[torch.Tensor], float], int, str | None]:
    """The step, the model's parameter count and its CPU matmul library. ``compile_cache``: run
    with ``compile.torchCompile``, Inductor's cache under it. ``library``: ``onednn`` or
    ``aten`` instead of the trainer's timed choice."""
    from llamajob_trainer.config import TrainerConfig
    from llamajob_trainer.parallel import init_distributed, parallelize
    from llamajob_trainer.train import build_optimizers, optimizer_step

    cfg = TrainerConfig.model_validate(
        {
            "batch": {"micro_batch_size": args.batch, "global_batch_size": args.batch},
            "data": {"seq_length": args.seq},
            "parallelism": {"activation_checkpointing": "none"},
            "precision": args.precision,
            "compile": {"torch_compile": True, "cache_dir": compile_cache}
            if compile_cache else {},
        }
    )
    pm = parallelize(cfg, arch, init_distributed())
    if library is not None and pm.cpu_matmul is not None:
        pm.use_cpu_matmul(library)
    optimizers = build_optimizers(pm, cfg.optimizer)

    def step(tokens: torch.Tensor) -> float:
        loss = pm.forward_backward([(tokens[:, :-1], tokens[:, 1:])])
        optimizer_step(pm, optimizers, 1.0)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in pm.parameters()), pm.cpu_matmul


def hf_step(
    arch: Architecture, args: argparse.Namespace, attn: str
) -> Callable[[torch.Tensor], float]:
    import transformers
    from llamajob_trainer.hf import hf_config

    config = transformers.LlamaConfig(
        **hf_config(arch, "float32"), use_cache=False, attn_implementation=attn
    )
    model = transformers.LlamaForCausalLM(config).float().train()
    opt = make_adamw(model.parameters())
    bf16 = args.precision == "bf16-mixed"

    def step(tokens: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            # Same token count as ours: seq inputs, labels shifted inside HF.
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# --- torchtitan baseline -----------------------------------------------------------------------
TORCHTITAN_INSTALL = (
    "pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 tyro docstring_parser typeguard"
)


def titan_ffn_args(arch: Architecture) -> tuple[int, float]:
    """``multiple_of`` and ``ffn_dim_multiplier`` that make torchtitan's SwiGLU width rule
    (``compute_ffn_hidden_dim``: 8/3 x dim, times the multiplier, rounded up to the multiple)
    land on our intermediate size. The multiple is the largest power of two up to 1024 (Llama
    3's own) dividing it, so the rounding cannot overshoot."""
    from torchtitan.models.common import compute_ffn_hidden_dim

    size = arch.intermediate_size
    multiple_of = next(m for m in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if size % m == 0)
    base = int(2 * 4 * arch.hidden_size / 3)
    multiplier = size / base
    if compute_ffn_hidden_dim(
        arch.hidden_size, multiple_of=multiple_of, ffn_dim_multiplier=multiplier
    ) != size:
        # int(multiplier * base) fell one short through float rounding, with nothing to round up.
        multiplier = (size + 0.5) / base
    return multiple_of, multiplier


def titan_model(arch: Architecture, seq: int, attention: str) -> torch.nn.Module:
    """torchtitan's Llama 3: ``torchtitan.models.llama3.Llama3Model`` (defined in
    ``torchtitan/models/llama3/model.py``, on the blocks of ``torchtitan/models/common``),
    configured as its ``llama3_configs`` factories do (fused QKV, its per-layer depth-scaled
    init), with our architecture. ``attention``: ``flex`` or ``varlen`` (its
    language-model backends) or ``sdpa`` (its ``ScaledDotProductAttention``, causal)."""
    import torchtitan.models.llama3 as titan_llama3
    from torchtitan.models.common import (
        ComplexRoPE,
        Embedding,
        Linear,
        RMSNorm,
        compute_ffn_hidden_dim,
    )
    from torchtitan.models.common.attention import ScaledDotProductAttention

    dim, vocab = arch.hidden_size, arch.vocab_size
    multiple_of, multiplier = titan_ffn_args(arch)
    hidden_dim = compute_ffn_hidden_dim(dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    assert hidden_dim == arch.intermediate_size, (hidden_dim, arch.intermediate_size)
    # The private helpers are the ones its own 1B..405B factories call; the package is pinned.
    layers = titan_llama3._build_llama3_layers(
        n_layers=arch.num_layers,
        dim=dim,
        n_heads=arch.num_heads,
        n_kv_heads=arch.num_kv_heads,
        hidden_dim=hidden_dim,
        # Plain RoPE as ours and HF's (its presets use Llama 3.1 "llama" scaling); the cache is
        # sized to the sequence, as its trainer resizes it to training.seq_len.
        rope=ComplexRoPE.Config(
            dim=arch.head_dim, max_seq_len=seq, theta=arch.rope_theta, scaling="none"
        ),
        fuse_qkv=True,
        # Its registry refuses "sdpa" for language models: build with flex, then swap below.
        attn_backend="flex" if attention == "sdpa" else attention,
    )
    for layer in layers:
        layer.attention_norm.eps = layer.ffn_norm.eps = arch.norm_eps
        if attention == "sdpa":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    tied = arch.tie_embeddings
    config = titan_llama3.Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        enable_weight_tying=tied,
        tok_embeddings=Embedding.Config(
            num_embeddings=vocab,
            embedding_dim=dim,
            param_init=titan_llama3._EMBEDDING_SKIP_INIT if tied else titan_llama3._EMBEDDING_INIT,
        ),
        norm=RMSNorm.Config(
            normalized_shape=dim, eps=arch.norm_eps, param_init=titan_llama3._NORM_INIT
        ),
        lm_head=Linear.Config(
            in_features=dim, out_features=vocab, param_init=titan_llama3._output_linear_init(dim)
        ),
        layers=layers,
    )
    model = config.build()
    model.init_states()
    return model.float().train()


def describe_failure(exc: BaseException) -> str:
    """The exception, where it was raised, and the last torchtitan line on the way."""
    frames = traceback.extract_tb(exc.__traceback__)
    message = (str(exc).strip().splitlines() or [""])[0]
    if len(message) > 160 and ". " in message:
        message = message[: message.index(". ") + 1]  # the first sentence says what stopped it
    message = (message if len(message) <= 160 else message[:157] + "...").rstrip(".")

    def where(frame: traceback.FrameSummary) -> str:
        # From the package directory on, so the line reads the same on any machine.
        parts = Path(frame.filename).parts
        for root in ("torchtitan", "torch"):
            if root in parts:
                parts = parts[len(parts) - parts[::-1].index(root) - 1:]
                break
        else:
            parts = parts[-1:]
        return f"{'/'.join(parts)}:{frame.lineno} ({frame.name})"

    text = f"{type(exc).__name__}: {message}"
    if frames:
        text += f"; raised at {where(frames[-1])}"
        titan = [f for f in frames if f"{os.sep}torchtitan{os.sep}" in f.filename]
        if titan and titan[-1] is not frames[-1]:
            text += f", from {where(titan[-1])}"
    return text


def titan_attention_probe(arch: Architecture, args: argparse.Namespace) -> dict[str, str]:
    """A forward and backward through each of torchtitan's language-model attention backends,
    on a model of our architecture cut to one layer (each stops, if it does, in its first
    attention)."""
    probe_arch = replace(arch, num_layers=1)
    tokens = torch.randint(0, arch.vocab_size, (args.batch, args.seq))
    positions = torch.arange(args.seq).expand(args.batch, args.seq)
    outcome: dict[str, str] = {}
    for backend in ("flex", "varlen"):
        try:
            model = titan_model(probe_arch, args.seq, backend)
            masks = model.get_attention_masks(positions=positions)
            model(tokens, positions=positions, attention_masks=masks).float().sum().backward()
            outcome[backend] = "trains on CPU"
        except Exception as exc:  # reported: where it stops is the finding
            outcome[backend] = describe_failure(exc)
    return outcome


def titan_step(
    arch: Architecture, args: argparse.Namespace, compiled: bool
) -> tuple[Callable[[torch.Tensor], float], int]:
    """torchtitan's model with the HF contender's minimal step; the step and its parameter
    count. ``compiled``: each transformer block ``compile(fullgraph=True)`` on Inductor, as
    ``torchtitan.distributed.compile.apply_compile`` does (the loss stays eager, as ours and
    HF's do)."""
    from torchtitan.components.loss import cross_entropy_loss

    model = titan_model(arch, args.seq, "sdpa")
    if compiled:
        for block in model.layers.values():
            block.compile(backend="inductor", fullgraph=True)
    opt = make_adamw(model.parameters())
    bf16 = args.precision == "bf16-mixed"
    # apply_compile sets these two Dynamo flags for the whole process (for MoE's data-dependent
    # shapes and activation checkpointing; no-ops for this model). Scoped to torchtitan's steps
    # here so that the other compiled contenders compile under Dynamo's defaults.
    dynamo_flags = {
        "capture_scalar_outputs": True,
        "skip_fwd_side_effects_in_bwd_under_checkpoint": True,
    }

    def step(tokens: torch.Tensor) -> float:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        with torch._dynamo.config.patch(dynamo_flags):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                # Its trainer's normalisation: the summed loss over the valid token count.
                loss = cross_entropy_loss(model(inputs), labels) / labels.numel()
            loss.backward()  # inside the patch: the backward graph is compiled on first use
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in model.parameters())


def titan_contenders(
    arch: Architecture, args: argparse.Namespace, compiled: bool, our_params: int
) -> tuple[dict[str, Callable[[torch.Tensor], float]], dict[str, Any]]:
    """torchtitan's contenders, and what to report about it (``status``: its version, or why it
    is unavailable). Prints its lines of the report."""
    if args.no_torchtitan:
        return {}, {"status": "skipped (--no-torchtitan)"}
    try:
        import torchtitan

        multiple_of, multiplier = titan_ffn_args(arch)
        probe = titan_attention_probe(arch, args)
        steps = {"titan": titan_step(arch, args, compiled=False)}
        if compiled:
            steps["titan_compiled"] = titan_step(arch, args, compiled=True)
    except Exception as exc:
        reason = describe_failure(exc)
        if isinstance(exc, ImportError):
            reason += f"; install: {TORCHTITAN_INSTALL}"
        print(f"torchtitan: unavailable ({reason})")
        return {}, {"status": f"unavailable: {reason}"}
    for name, (_, count) in steps.items():
        assert count == our_params, f"{name}: {count} parameters, ours {our_params}"
    print(f"torchtitan {torchtitan.__version__}: torchtitan.models.llama3.Llama3Model, "
          f"ffn_dim_multiplier {multiplier:.6g} x multiple_of {multiple_of} -> mlp "
          f"{arch.intermediate_size}, {our_params:,} params (= ours)")
    for backend, outcome in probe.items():
        print(f"  its {backend} attention, training on CPU: {outcome}")
    print("  runs its ScaledDotProductAttention inner attention (causal)")
    info = {
        "status": torchtitan.__version__,
        "model": "torchtitan.models.llama3.Llama3Model",
        "attention": "ScaledDotProductAttention",
        "ffn_dim_multiplier": multiplier,
        "multiple_of": multiple_of,
        **{f"{backend}_attention": outcome for backend, outcome in probe.items()},
    }
    return {name: step for name, (step, _) in steps.items()}, info


def time_steps(
    steps: dict[str, Callable[[torch.Tensor], float]], batches: list[torch.Tensor], warmup: int,
    optional: frozenset[str] = frozenset(),
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, str]]:
    """Alternate the contenders step by step; returns each one's step times, each one's first
    (warmup) step time, which holds torch.compile's compilation, and why any of ``optional``
    (a third-party baseline) failed: it is dropped, and the others go on."""
    first: dict[str, float] = {}
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, tokens in enumerate(batches):
        for name, step in steps.items():
            if name in failed:
                continue
            start = time.perf_counter()
            try:
                step(tokens)
            except Exception as exc:
                if name not in optional:
                    raise
                failed[name] = describe_failure(exc)
                continue
            elapsed = time.perf_counter() - start
            if i == 0:
                first[name] = elapsed
            if i >= warmup:
                times[name].append(elapsed)
    return {n: t for n, t in times.items() if n not in failed}, first, failed


# --- checkpoint save (2 ranks, run under torchrun) ---------------------------------------------
def checkpoint_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from llamajob_trainer.checkpoint import CheckpointManager
    from llamajob_trainer.config import TrainerConfig
    from llamajob_trainer.parallel import init_distributed, parallelize, shutdown_distributed
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    env = init_distributed()
    arch = ckpt_arch(args.quick)
    cfg = TrainerConfig.model_validate(
        {
            "batch": {"micro_batch_size": 1, "global_batch_size": env.world_size},
            "data": {"seq_length": 64},
            "parallelism": {"fsdp": True},
            "precision": "fp32",
        }
    )
    pm = parallelize(cfg, arch, env)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
    tokens = torch.randint(0, arch.vocab_size, (1, 65))
    pm.forward_backward([(tokens[:, :-1], tokens[:, 1:])])
    opt.step()  # creates the Adam moments, so the optimizer state is its full size
    root = Path(os.environ["BENCH_CKPT_DIR"])
    manager = CheckpointManager(
        root / "sharded", keep=1, fingerprint="bench", rank=env.rank, world_size=env.world_size,
        log=lambda _msg: None,
    )
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    reps = 2 if args.quick else 3
    sharded, gathered = [], []
    for rep in range(reps):
        dist.barrier()
        sharded.append(manager.save(rep + 1, pm.model_parts, [opt], {}))
        dist.barrier()
        start = time.perf_counter()
        state = {
            "model": get_model_state_dict(pm.model_parts[0], options=full),
            "optim": get_optimizer_state_dict(pm.model_parts[0], opt, options=full),
        }
        if env.rank == 0:
            path = root / f"full_{rep}.pt"
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        del state
        dist.barrier()
        gathered.append(time.perf_counter() - start)
        if env.rank == 0:
            (root / f"full_{rep}.pt").unlink()
    if env.rank == 0:
        state_bytes = sum(f.stat().st_size for f in (root / "sharded").rglob("*") if f.is_file())
        Path(args.checkpoint_worker).write_text(
            json.dumps(
                {
                    "sharded": sharded,
                    "gathered": gathered,
                    "params": sum(p.numel() for p in pm.parameters()),  # global (DTensor) sizes
                    "bytes": state_bytes,
                }
            )
        )
    shutdown_distributed()


def ckpt_arch(quick: bool) -> Architecture:
    # Big enough that writing dominates: ~45M (quick) / ~165M parameters, with Adam moments
    # 0.5 GB / 2 GB of state.
    if quick:
        return Architecture(512, 4, 8, 4, 1536, 32000, 500000.0, 1024)
    return Architecture(1024, 8, 16, 4, 3072, 32000, 500000.0, 1024)


def run_two_ranks(script: str, worker_flag: str, *extra: str, timeout: float) -> dict[str, Any]:
    """Run `script WORKER_FLAG OUT EXTRA...` as 2 torchrun ranks in a scratch directory (their
    BENCH_CKPT_DIR and TMPDIR); rank 0 writes its result as JSON to OUT, returned here."""
    with tempfile.TemporaryDirectory(prefix="llamajob-bench-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, BENCH_CKPT_DIR=tmp, TMPDIR=tmp, OMP_NUM_THREADS="1")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", script, worker_flag, str(out), *extra,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"checkpoint benchmark failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def run_checkpoint_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    return run_two_ranks(__file__, "--checkpoint-worker", *(["--quick"] if args.quick else []),
                         timeout=1800)


# --- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.checkpoint_worker:
        checkpoint_worker(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = arch_from(args)
    steps = args.steps or (3 if args.quick else 8)
    warmup = 1 if args.quick else 2
    tokens_per_step = args.batch * args.seq
    batches = [
        torch.randint(0, arch.vocab_size, (args.batch, args.seq + 1)) for _ in range(warmup + steps)
    ]
    print(f"model: hidden {arch.hidden_size}, layers {arch.num_layers}, heads {arch.num_heads}/"
          f"{arch.num_kv_heads} kv, mlp {arch.intermediate_size}, vocab {arch.vocab_size}, "
          f"{arch.num_params() / 1e6:.1f}M params; batch {args.batch} x seq {args.seq}; "
          f"{args.precision}; {args.threads} threads; {steps} timed steps")
    compiled = not args.no_compile
    our_eager, our_params, library = our_step(arch, args)
    # One timed choice for all of ours, so eager and compiled run on the same library.
    contenders = {"ours": our_eager}
    if library is not None:
        print(f"ours: CPU matmul {LIBRARY_NAMES[library]}, chosen by timing this model's shapes")
    # A cold cache of its own, so the compile time printed is the real first-run cost.
    compile_cache = tempfile.TemporaryDirectory(prefix="llamajob-bench-compile-")
    other = {"onednn": "aten", "aten": "onednn"}.get(library or "")
    if compiled:
        contenders["ours_compiled"] = our_step(arch, args, compile_cache.name, library)[0]
        if other is not None:
            # What the choice is worth: the same compiled model on the other library.
            contenders[ABLATION[other]] = our_step(arch, args, compile_cache.name, other)[0]
    contenders |= {
        "hf_eager": hf_step(arch, args, "eager"),
        "hf_sdpa": hf_step(arch, args, "sdpa"),
    }
    titan_steps, titan_info = titan_contenders(arch, args, compiled, our_params)
    contenders |= titan_steps
    peak_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    peaks_before = matmul_peak_gflops(peak_dtype)
    times, first, failed = time_steps(contenders, batches, warmup, frozenset(titan_steps))
    for name, reason in failed.items():
        print(f"torchtitan: unavailable ({name} stopped: {reason})")
        titan_info.setdefault("failed", {})[name] = reason
    if titan_steps and set(failed) == set(titan_steps):
        titan_info["status"] = "unavailable: " + "; ".join(
            f"{name} stopped: {reason}" for name, reason in failed.items()
        )
    median = {name: statistics.median(t) for name, t in times.items()}
    tps = {name: tokens_per_step / m for name, m in median.items()}
    for name, t in times.items():
        print(f"  {name:16s} median step {median[name]:.3f}s  {tps[name]:9.1f} tokens/s "
              f"(steps: {', '.join(f'{x:.2f}' for x in t)})")
    # Measured before and after the steps; the higher one is the fairer (harsher) peak when
    # other work on the machine slowed one of them. MFU is against the faster library's.
    peaks = {k: max(v, after) for (k, v), after in
             zip(peaks_before.items(), matmul_peak_gflops(peak_dtype).values(), strict=True)}
    peak = max(peaks.values())
    fpt = flops_per_token(arch, args.seq)
    mfu = {name: fpt * tps[name] / 1e9 / peak for name in tps if not name.startswith("hf")}
    print(f"matmul peak ({peak_dtype}, {args.threads} threads): "
          + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items())
          + " GFLOP/s; MFU " + ", ".join(f"{name} {value:.1%}" for name, value in mfu.items()))
    titans = {name: label for name, label in (("titan", "eager"), ("titan_compiled", "compiled"))
              if name in tps}
    for name in (n for n in tps if n.startswith("ours")):
        print(f"{name} vs HF eager: {tps[name] / tps['hf_eager']:.2f}x; "
              f"vs HF sdpa: {tps[name] / tps['hf_sdpa']:.2f}x"
              + "".join(f"; vs torchtitan {label}: {tps[name] / tps[titan]:.2f}x"
                        for titan, label in titans.items()))
    head = "ours_compiled" if compiled else "ours"
    # Like against like: our compiled step against torchtitan's compiled one, eager against eager.
    titan_head = "titan_compiled" if compiled else "titan"

    def vs_titan(name: str, titan: str) -> float | None:
        return round(tps[name] / tps[titan], 3) if titan in tps else None

    def titan_figure(figures: dict[str, float], name: str, digits: int) -> float | None:
        return round(figures[name], digits) if name in figures else None

    result: dict[str, Any] = {
        "torch_compile": compiled,
        "tokens_per_second": round(tps[head], 1),
        "hf_tokens_per_second": round(tps["hf_eager"], 1),
        "hf_sdpa_tokens_per_second": round(tps["hf_sdpa"], 1),
        "ratio_vs_hf": round(tps[head] / tps["hf_eager"], 3),
        "ratio_vs_hf_sdpa": round(tps[head] / tps["hf_sdpa"], 3),
        "mfu": round(mfu[head], 4),
        "eager_tokens_per_second": round(tps["ours"], 1),
        "eager_ratio_vs_hf": round(tps["ours"] / tps["hf_eager"], 3),
        "eager_mfu": round(mfu["ours"], 4),
        "torchtitan": titan_info["status"],
        "torchtitan_tokens_per_second": titan_figure(tps, titan_head, 1),
        "ratio_vs_torchtitan": vs_titan(head, titan_head),
        "torchtitan_mfu": titan_figure(mfu, titan_head, 4),
        "torchtitan_eager_tokens_per_second": titan_figure(tps, "titan", 1),
        "eager_ratio_vs_torchtitan": vs_titan("ours", "titan"),
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peaks_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "model_gflops": round(fpt * tps[head] / 1e9, 1),
        "hidden_size": arch.hidden_size,
        "precision": args.precision,
        "threads": args.threads,
        "cpu_matmul": library,
    }
    if compiled:
        # The first step's extra time over a steady step is the cold-cache compilation.
        compile_seconds = first["ours_compiled"] - median["ours_compiled"]
        print(f"torch.compile (cold cache): {compile_seconds:.1f} s once, in the first step")
        result["compile_seconds"] = round(compile_seconds, 1)
        if other is not None:
            ablation = ABLATION[other]
            result["other_library"] = other
            result["other_library_ratio_vs_hf"] = round(tps[ablation] / tps["hf_eager"], 3)
            result["other_library_ratio_vs_torchtitan"] = vs_titan(ablation, titan_head)
            result["other_library_mfu"] = round(mfu[ablation], 4)
        if "titan_compiled" in median:
            titan_compile = first["titan_compiled"] - median["titan_compiled"]
            print(f"torchtitan torch.compile (cold cache): {titan_compile:.1f} s once")
            result["torchtitan_compile_seconds"] = round(titan_compile, 1)
    if titan_info["status"][0].isdigit():
        result["torchtitan_config"] = {k: v for k, v in titan_info.items() if k != "status"}
    if not args.skip_checkpoint:
        ck = run_checkpoint_benchmark(args)
        sharded, gathered = statistics.median(ck["sharded"]), statistics.median(ck["gathered"])
        print(f"checkpoint ({ck['params'] / 1e6:.0f}M params + Adam, {ck['bytes'] / 1e9:.2f} GB,"
              f" 2 ranks FSDP2): sharded save {sharded:.2f}s vs gather + torch.save "
              f"{gathered:.2f}s -> {gathered / sharded:.2f}x "
              f"(runs: {ck['sharded']} vs {ck['gathered']})")
        result |= {
            "checkpoint_save_seconds": round(sharded, 3),
            "torch_save_seconds": round(gathered, 3),
            "checkpoint_speedup": round(gathered / sharded, 3),
            "checkpoint_bytes": ck["bytes"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
