"""The training loop of one rank (`llamajob train --config FILE`, started by torchrun).

Per step: the data-parallel rank's micro-batches -> `forward_backward` (gradient accumulation,
global mean loss) -> clip -> AdamW step -> learning-rate schedule -> validation loss every
`validation.everySteps` steps (when `validation.sequences` holds sequences out) -> log/metrics ->
checkpoint every `checkpoint.everySteps` steps and at the end -> fault injection hook.

Validation. The last `validation.sequences` rows of the dataset are never trained on; each
evaluation runs all of them forward only (no gradients, no RNG, no data position), so it changes
nothing in training and a resumed run evaluates the same rows. The reported figure is the mean
token loss over them; it is logged, written to the JSONL record and exported as a metric.

Resume and determinism. A resumed run restores parameters, optimizer moments, the step (the
learning rate is a pure function of it), the data position (consumed samples) and every rank's
RNG state, so the steps after a resume see the same batches and start from the same bits as the
uninterrupted run would. Per-step losses are then bit-identical to the uninterrupted run when all
of these hold (tests/test_train_resume.py checks it):
- the same layout and world size (a different layout reshards correctly but changes the order
  of floating-point reductions, so losses agree only to rounding);
- the same torch build, the same intra-op thread count (OMP_NUM_THREADS; torchrun sets 1 per
  process when it starts several), the same hardware and the same CPU matmul library (a
  checkpoint records the one its run used and the resumed run takes it; see ``cpu_linear``);
- device cpu on the torch backend (gloo reductions and CPU kernels are deterministic); cuda or
  neuron runs would also need `torch.use_deterministic_algorithms(True)` (on TorchNeuron it also
  turns off Adaptive Eager Execution's fusion), which this trainer does not set; the RNG state
  captured is the CPU's and the training device's (`parallel.device`);
- the same training config, maxSteps and validation.sequences included (they shape the
  learning-rate decay and which rows are trained on); checkpoint, metrics and logging settings
  and validation.everySteps may differ. The fingerprint refuses a different model.
Model initialisation depends only on the seed (per-parameter generators), never on the layout.

Divergence. Loss and gradient norm are reduced over all ranks, so every rank sees the same
values; a non-finite one ends the loop at that step on every rank, after the step is logged and
before validation or any save, with `TrainingDiverged` (exit code 80 and a termination message
the supervisors read; restartPolicy.onDivergence decides whether the job fails or rolls back).
The newest checkpoint therefore always holds finite state.

Termination. With `checkpoint.saveOnTerminate` (the default) SIGTERM does not kill a rank
mid-step: the step finishes, the ranks agree (one all-reduce per step, because the signal
reaches them at different moments), all save the current step and the process exits with 143
(128 + SIGTERM, retryable). Kubernetes sends SIGTERM when a pod is deleted (node drain,
preemption, the operator replacing a gang) and `llamajob run` does on Ctrl-C; the restart then
resumes at the step where the signal arrived. A second SIGTERM changes nothing; SIGKILL at the
end of the grace period can only tear the save in progress, which is never loaded.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from . import cpu_linear, protocol
from . import metrics as m
from .chaos import Chaos, ChaosConfig
from .checkpoint import CheckpointManager
from .config import OptimizerSpec, TrainerConfig
from .data import (
    BatchSource,
    DataState,
    PackedDataset,
    check_compatible,
    read_metadata,
    validation_rounds,
)
from .errors import ConfigError, TrainingDiverged
from .presets import Architecture
from .tokenizer import load_tokenizer

if TYPE_CHECKING:
    from .parallel import DistEnv, ParallelModel


class Terminated(Exception):
    """Raised out of `train` after SIGTERM, once the current step is saved."""

    def __init__(self, step: int) -> None:
        super().__init__(f"terminated by SIGTERM after step {step}; saved step_{step}")
        self.step = step


class TerminationRequest:
    """Turns SIGTERM into a flag that the loop reads at step boundaries."""

    def __init__(self, enabled: bool) -> None:
        # Python delivers signals to the main thread only; elsewhere (an embedding
        # application's worker thread) SIGTERM keeps its default meaning.
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: Any = None
        if self.enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass(frozen=True)
class TrainOptions:
    log_jsonl: str | None = None
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    log: Callable[[str], None] = lambda line: print(line, flush=True)


# --- pure pieces -------------------------------------------------------------------------------


def lr_at(step: int, spec: OptimizerSpec, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then decay to minLr."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    span = max(1, max_steps - spec.warmup_steps)
    progress = min(1.0, max(0.0, (step - spec.warmup_steps) / span))
    if spec.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr + (spec.lr - spec.min_lr) * shape


def schedule_state(step: int, spec: OptimizerSpec, max_steps: int) -> dict[str, Any]:
    """The schedule's position, saved for the record: the rate is recomputed from the step, so a
    resumed run with a changed maxSteps or schedule follows the new one from where it is."""
    return {
        "step": step,
        "schedule": spec.schedule,
        "warmup_steps": spec.warmup_steps,
        "max_steps": max_steps,
        "next_lr": lr_at(step, spec, max_steps),
    }


def cpu_matmul_line(library: str, seconds: dict[str, float]) -> str:
    """The log line that says which library the fp32 CPU linears run on, and why."""
    names = cpu_linear.LIBRARY_NAMES
    if not seconds:
        why = (f"set by {cpu_linear.ENV_VAR}" if cpu_linear.requested() != "auto"
               else "torch has no oneDNN kernel")
        return f"CPU matmul: {names[library]} ({why})"
    timed = ", ".join(f"{names[lib]} {sec * 1000:.1f} ms" for lib, sec in sorted(seconds.items()))
    return f"CPU matmul: {names[library]} (timed on this model's linear shapes: {timed})"


def resume_cpu_matmul(pm: ParallelModel, recorded: str | None, log: Callable[[str], None]) -> None:
    """A resumed run computes with the library its checkpoint was trained on (bit-identical
    resume), unless the environment variable pins another; then it says what that costs."""
    if pm.cpu_matmul is None or recorded is None or recorded == pm.cpu_matmul:
        return
    if recorded not in cpu_linear.LIBRARIES:
        log(f"checkpoint records CPU matmul {recorded!r}, unknown here; keeping {pm.cpu_matmul}")
        return
    names = cpu_linear.LIBRARY_NAMES
    if cpu_linear.requested() == "auto" and (recorded == "aten" or cpu_linear.available()):
        pm.use_cpu_matmul(recorded)
        log(f"CPU matmul: {names[recorded]}, as the checkpoint was trained (timed choice was "
            "overridden for a bit-identical resume)")
    else:
        log(f"CPU matmul: {names[pm.cpu_matmul]} ({cpu_linear.ENV_VAR} or this torch build), "
            f"while the checkpoint was trained on {names[recorded]}: losses will agree with an "
            "uninterrupted run only to rounding")


def set_lr(optimizers: Sequence[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (projections, embeddings), none on norm gains and biases."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def to_batch(rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """Rows of seq_length + 1 tokens -> (input_ids, labels), each [rows, seq_length]."""
    tokens = torch.from_numpy(rows)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class Validation:
    """The held-out tail of the dataset (`validation.sequences` rows), evaluated as whole
    global batches, each data-parallel rank taking its share as in training."""

    def __init__(self, cfg: TrainerConfig, dataset: PackedDataset, pm: ParallelModel) -> None:
        self.every = cfg.validation.every_steps
        self.dataset = dataset
        self.pm = pm
        self.rounds = validation_rounds(
            len(dataset), cfg.validation.sequences, cfg.batch.global_batch_size,
            pm.dp_rank, pm.dp_size, cfg.batch.micro_batch_size,
        )
        self.runs = 0

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.rounds) and is_due(step, self.every, max_steps)

    def loss(self) -> float:
        """Mean token loss over the held-out rows, the same on every rank."""
        loss_sum, tokens = 0.0, 0
        for micro in self.rounds:
            batch = [to_batch(self.dataset.rows(indices)) for indices in micro]
            batch_sum, batch_tokens = self.pm.evaluate(batch)
            loss_sum, tokens = loss_sum + batch_sum, tokens + batch_tokens
        self.runs += 1
        return loss_sum / max(tokens, 1)


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Checkpoints and validation: every `every` steps, and after the last one."""
    return step % every == 0 or step == max_steps


# --- preflight: the user errors we can find before joining the process group ------------------


def open_dataset(cfg: TrainerConfig) -> PackedDataset:
    arch = cfg.model.architecture()
    identity = load_tokenizer(cfg.model.tokenizer).identity if cfg.model.tokenizer else None
    meta = read_metadata(cfg.data.path)
    check_compatible(
        meta,
        seq_length=cfg.data.seq_length,
        vocab_size=arch.vocab_size,
        global_batch_size=cfg.batch.global_batch_size,
        tokenizer_identity=identity,
        held_out=cfg.validation.sequences,
    )
    if cfg.data.seq_length > arch.max_position_embeddings:
        raise ConfigError(
            f"data.seqLength ({cfg.data.seq_length}) exceeds model.maxPositionEmbeddings "
            f"({arch.max_position_embeddings})"
        )
    return PackedDataset(cfg.data.path)


def check_resume(cfg: TrainerConfig) -> None:
    """The checkpoint errors a restart cannot fix (an impossible resume mode, another model's
    checkpoints), before joining the process group. Read-only: damage is judged by the ranks
    together when they restore (`CheckpointManager.restore`)."""
    reader = CheckpointManager(
        cfg.checkpoint.dir, keep=cfg.checkpoint.keep, fingerprint=cfg.training_fingerprint()
    )
    reader.preflight(cfg.checkpoint.resume)


# --- the loop --------------------------------------------------------------------------------


class _Rank0:
    """Logging, JSONL and Prometheus, active on global rank 0 only."""

    def __init__(self, cfg: TrainerConfig, options: TrainOptions, active: bool) -> None:
        self.active = active
        self.log = options.log if active else (lambda line: None)
        self.jsonl = m.JsonlLog(options.log_jsonl if active else None)
        self.metrics: m.TrainerMetrics | None = None
        self.server: Any = None
        if active:
            registry, self.metrics = m.build_registry(cfg.job_name, cfg.namespace)
            if cfg.metrics_port:
                try:
                    self.server = m.serve(registry, cfg.metrics_port)
                except OSError as exc:
                    # Usually a previous attempt still holding the port: retryable, not permanent.
                    raise RuntimeError(
                        f"metricsPort {cfg.metrics_port}: cannot serve metrics ({exc}); pick a "
                        "free port or 0 to disable"
                    ) from exc

    def close(self) -> None:
        self.jsonl.close()
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def train(cfg: TrainerConfig, options: TrainOptions | None = None) -> int:
    """Run (or resume) the job; returns the last completed step."""
    from .parallel import init_distributed, parallelize, shutdown_distributed

    options = options or TrainOptions()
    dataset = open_dataset(cfg)
    check_resume(cfg)
    arch = cfg.model.architecture()
    env = init_distributed(cfg.resolved_backend, cfg.device)
    torch.manual_seed(cfg.seed)
    rank0 = _Rank0(cfg, options, env.rank == 0)
    terminate = TerminationRequest(cfg.checkpoint.save_on_terminate)
    try:
        pm = parallelize(cfg, arch, env)
        step = _loop(cfg, options, dataset, arch, env, pm, rank0, terminate)
    except Terminated:
        shutdown_distributed()  # every rank agreed and saved: as clean an exit as success
        raise
    finally:
        terminate.restore()
        rank0.close()
    # Only on success: after an error, shutdown's barrier would wait for peers that may be
    # stuck in a collective; the process exits and torchrun tears the group down instead.
    shutdown_distributed()
    return step


def _loop(
    cfg: TrainerConfig,
    options: TrainOptions,
    dataset: PackedDataset,
    arch: Architecture,
    env: DistEnv,
    pm: ParallelModel,
    rank0: _Rank0,
    terminate: TerminationRequest,
) -> int:
    from .parallel import device as devices

    log = rank0.log
    max_steps = cfg.total_steps()
    spec = cfg.optimizer
    optimizers = build_optimizers(pm, spec)
    chaos = Chaos(options.chaos, cfg.checkpoint.dir, env.rank)
    ckpt = CheckpointManager(
        cfg.checkpoint.dir,
        keep=cfg.checkpoint.keep,
        fingerprint=cfg.training_fingerprint(),
        rank=env.rank,
        world_size=env.world_size,
        async_save=cfg.checkpoint.async_save,
        before_done=chaos.before_checkpoint_done,
        log=log,
        state_io=pm.state_io(),
    )
    ckpt.prepare()
    grad_accum = cfg.batch.global_batch_size // (cfg.batch.micro_batch_size * pm.dp_size)
    n_params = sum(p.numel() for p in pm.parameters())
    log(
        f"llamajob train: job {cfg.namespace}/{cfg.job_name}, backend {cfg.resolved_backend} "
        f"({env.backend}) on {env.device}, world {env.world_size} = pp {pm.pp_size} x dp "
        f"{pm.dp_size} x tp {pm.tp_size}, fsdp {cfg.parallelism.fsdp}, grad accum {grad_accum}, "
        f"{arch.num_params() / 1e6:.2f}M params ({n_params / 1e6:.2f}M on rank 0), "
        f"{cfg.tokens_per_step():,} tokens/step, {max_steps} steps, threads "
        f"{torch.get_num_threads()}"
    )
    if pm.cpu_matmul is not None:
        log(cpu_matmul_line(pm.cpu_matmul, pm.cpu_matmul_seconds))

    restarts = int(os.environ.get(protocol.TORCHELASTIC_RESTART_COUNT_ENV, "0") or 0)
    if rank0.metrics:
        rank0.metrics.process_restarts.set(restarts)
    if restarts:
        log(f"torchrun restarted the processes in place ({restarts} time(s) in this attempt)")
    step, data_state = 0, DataState()
    started = time.perf_counter()
    state = ckpt.restore(cfg.checkpoint.resume, pm.model_parts, optimizers)
    if rank0.metrics:
        rank0.metrics.checkpoints_quarantined.set(ckpt.quarantine_count())
    if state is not None:
        step, data_state = int(state["step"]), DataState.from_state_dict(state["data"])
        # Checkpoints from before the library was recorded were trained on oneDNN, then the
        # only default.
        resume_cpu_matmul(pm, state.get("cpu_matmul", "onednn"), log)
        seconds = time.perf_counter() - started
        if rank0.metrics:
            rank0.metrics.checkpoint_load_seconds.observe(seconds)
            rank0.metrics.last_checkpoint_step.set(step)
        log(f"resumed from step_{step} ({data_state.consumed_samples} samples consumed) "
            f"in {seconds:.2f} s")
    elif cfg.model.pretrained:
        from .hf import apply_pretrained

        count = apply_pretrained(pm.model_parts, cfg.model.pretrained, arch)
        log(f"fresh start from pretrained weights {cfg.model.pretrained} ({count} tensors)")
    else:
        log(f"fresh start (seed {cfg.seed})")

    source = BatchSource(
        dataset,
        seed=cfg.seed,
        global_batch_size=cfg.batch.global_batch_size,
        micro_batch_size=cfg.batch.micro_batch_size,
        dp_rank=pm.dp_rank,
        dp_size=pm.dp_size,
        state=data_state,
        held_out=cfg.validation.sequences,
    )
    validation = Validation(cfg, dataset, pm)
    tokens_per_step = cfg.tokens_per_step()
    fpt = m.flops_per_token(arch, cfg.data.seq_length)
    peak = 0.0
    if rank0.active:
        measured = None
        if cfg.peak_tflops_per_core is None and devices.measures_peak_flops(env.device):
            measured = m.measure_cpu_peak_flops()
        peak = m.peak_flops_total(cfg.peak_tflops_per_core, env.world_size, measured)
        if peak > 0:
            log(f"MFU peak: {peak / 1e12:.3f} TFLOP/s for {env.world_size} rank(s) "
                f"({'catalogue' if cfg.peak_tflops_per_core else 'measured fp32 matmul'}); "
                f"{fpt / 1e6:.2f} MFLOP per token")
        else:
            # Only a CPU's matmul is timed here; an accelerator's peak is the catalogue's.
            log(f"MFU not measured on {env.device.type}: peakTflopsPerCore is unset; "
                "MFU is reported as 0")
    if rank0.metrics:
        rank0.metrics.max_steps.set(max_steps)
        rank0.metrics.step.set(step)
    if step >= max_steps:
        log(f"nothing to do: step {step} >= maxSteps {max_steps}")
        return step

    def extra_state(at: int) -> dict[str, Any]:
        return {
            "data": source.state.state_dict(),
            "scheduler": schedule_state(at, spec, max_steps),
            "layout": {"pp": pm.pp_size, "dp": pm.dp_size, "tp": pm.tp_size,
                       "fsdp": cfg.parallelism.fsdp},
            "tokens_seen": source.state.consumed_samples * cfg.data.seq_length,
            "cpu_matmul": pm.cpu_matmul,
        }

    def save(at: int) -> None:
        seconds = ckpt.save(at, pm.model_parts, optimizers, extra_state(at))
        if rank0.metrics:
            rank0.metrics.checkpoint_save_seconds.observe(seconds)
        if not cfg.checkpoint.async_save:
            _saved(at)
        log(f"checkpoint step_{at} {'started' if cfg.checkpoint.async_save else 'saved'} "
            f"in {seconds:.2f} s")

    def _saved(at: int | None) -> None:
        if at is not None and rank0.metrics:
            rank0.metrics.last_checkpoint_step.set(at)

    first_step = step
    while step < max_steps:
        started = time.perf_counter()
        lr = lr_at(step, spec, max_steps)
        set_lr(optimizers, lr)
        micro_batches = [to_batch(rows) for rows in source.next_micro_batches()]
        chaos.before_step(step + 1, pm.parameters())
        loss = pm.forward_backward(micro_batches)
        grad_norm = optimizer_step(pm, optimizers, spec.grad_clip)
        # The nxd backend's loss is read with the optimizer step's graph (one host wait per
        # step); float() is where it arrives. The torch backend's is a float already.
        loss = float(loss)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - started
        # Loss and norm are global (reduced over all ranks), so every rank agrees on this.
        diverged = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if step == first_step + 1:
            if report := pm.compile_report():
                log(report)
            if rank0.active:
                _log_device_memory(env, log)
        validation_loss = None
        if validation.due(step, max_steps) and not diverged:
            first_validation = validation.runs == 0
            validation_loss = validation.loss()
            if first_validation and (report := pm.compile_report()):
                log(report)  # forward-only graphs now loaded too
        if rank0.active:
            tps = tokens_per_step / seconds
            record = m.StepRecord(
                step=step,
                max_steps=max_steps,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_second=tps,
                samples_per_second=cfg.batch.global_batch_size / seconds,
                mfu=m.mfu(tps, fpt, peak),
                step_seconds=seconds,
                consumed_samples=source.state.consumed_samples,
                validation_loss=validation_loss,
            )
            log(record.log_line())
            rank0.jsonl.write(record)
            if rank0.metrics:
                rank0.metrics.record_step(record)
        if diverged:
            # Before any save: the newest checkpoint stays the last good state. A background
            # save of an earlier step may finish; it holds good state too.
            _saved(ckpt.wait())
            raise TrainingDiverged(step, loss, grad_norm, ckpt.latest_complete_step())
        saved = is_due(step, cfg.checkpoint.every_steps, max_steps)
        if saved:
            save(step)
        elif cfg.checkpoint.async_save:
            _saved(ckpt.poll())
        chaos.after_step(step)
        if terminate.enabled and step < max_steps and pm.any_rank(terminate.requested):
            log(f"SIGTERM: saving step_{step} before exiting")
            if not saved:
                save(step)
            _saved(ckpt.wait())
            raise Terminated(step)
    _saved(ckpt.wait())
    if rank0.active:
        _log_device_memory(env, log)
    log(f"done: {step} steps")
    return step


def _log_device_memory(env: DistEnv, log: Callable[[str], None]) -> None:
    """Rank 0's peak device memory so far, where the device's allocator keeps the figure
    (accelerators; nothing on CPU)."""
    from .parallel import device as devices

    peak = devices.max_memory_allocated(env.device)
    if peak is not None:
        log(f"device memory: peak {peak / 2**30:.2f} GiB allocated by tensors on {env.device} "
            "(rank 0)")


def build_optimizers(pm: ParallelModel, spec: OptimizerSpec) -> list[torch.optim.Optimizer]:
    """One AdamW per model part (pipeline stages may hold several), as DCP expects; the backend
    may wrap it (NxD's ZeRO-1 optimizer on Neuron)."""
    return [
        pm.make_optimizer(
            torch.optim.AdamW,
            param_groups(part, spec.weight_decay),
            lr=spec.lr,
            betas=spec.betas,
            eps=spec.eps,
        )
        for part in pm.model_parts
    ]


def optimizer_step(
    pm: ParallelModel, optimizers: Sequence[torch.optim.Optimizer], max_norm: float
) -> float:
    """Clip the global gradient norm once, step every optimizer; returns the pre-clip norm."""
    if len(optimizers) == 1:
        return pm.optimizer_step(optimizers[0], max_norm)
    norm = pm.clip_grad_norm(max_norm)
    for opt in optimizers:
        opt.step()
    return norm
