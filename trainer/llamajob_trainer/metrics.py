"""Trainer metrics: the Prometheus endpoint on rank 0, the per-step log line and JSONL records.

Importing this module does not import torch (the chart tests list the metric names through
`build_registry`); only `measure_cpu_peak_flops` does, when called.

MFU (model FLOPs utilisation) = achieved model FLOPs per second / peak FLOPs per second.
- Model FLOPs per token = 6 * N + 12 * L * h * s (Chinchilla/PaLM convention: 2 for the forward
  and 4 for the backward matmuls per parameter, plus attention scores and values). N counts
  every parameter that takes part in a matmul: all layers, the final norm and the output head,
  but not the input embedding table, which is a lookup. Activation recompute is not counted
  (it is hardware work, not model work), so MFU is comparable across recompute settings.
- Peak = `peakTflopsPerCore` from the instance catalogue (Trainium: BF16 dense per NeuronCore)
  times the number of ranks; without it, on device cpu, a fp32 matmul timed once per process
  (the faster of torch.mm and oneDNN) stands in for the per-rank peak, so CPU MFU says how close
  the step is to this machine's matmul speed. An accelerator (cuda, neuron) without a catalogue
  figure has no peak and reports MFU 0: timing a matmul there would measure one kernel's speed,
  not the device's rated peak.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from . import protocol
from .presets import Architecture

LABELS = ("job", "namespace")

# Step times range from well under a second (tiny on CPU) to minutes (70B): log-spaced buckets.
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800)


class TrainerMetrics:
    """The trainer's metric families, bound to one job's labels."""

    def __init__(self, registry: CollectorRegistry, job: str, namespace: str) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            child = Gauge(name, doc, LABELS, registry=registry).labels(job, namespace)
            # NaN until measured: a fresh or resuming process must not report step 0 / loss 0.
            child.set(float("nan"))
            return child

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, registry=registry, buckets=buckets).labels(
                job, namespace
            )

        self.step = gauge(protocol.TRAIN_STEP, "Optimizer steps completed.")
        self.loss = gauge(protocol.TRAIN_LOSS, "Mean training loss of the last step.")
        self.tokens_per_second = gauge(
            protocol.TRAIN_TOKENS_PER_SECOND, "Training tokens per second, all ranks."
        )
        self.samples_per_second = gauge(
            protocol.TRAIN_SAMPLES_PER_SECOND, "Training sequences per second, all ranks."
        )
        self.mfu = gauge(protocol.TRAIN_MFU, "Model FLOPs utilisation of the last step (0-1).")
        self.grad_norm = gauge(protocol.TRAIN_GRAD_NORM, "Global gradient norm before clipping.")
        self.learning_rate = gauge(protocol.TRAIN_LEARNING_RATE, "Learning rate of the last step.")
        self.max_steps = gauge(protocol.TRAIN_MAX_STEPS, "Optimizer steps the job will run.")
        self.process_restarts = gauge(
            protocol.TRAIN_PROCESS_RESTARTS,
            "In-place restarts of the training processes by torchrun in this attempt "
            "(restartPolicy.processRestarts).",
        )
        self.validation_loss = gauge(
            protocol.VALIDATION_LOSS,
            "Mean token loss on the held-out validation sequences at the last evaluation.",
        )
        self.last_checkpoint_step = gauge(
            protocol.LAST_CHECKPOINT_STEP, "Step of the newest complete checkpoint."
        )
        self.step_seconds = histogram(
            protocol.TRAIN_STEP_SECONDS, "Wall time of one optimizer step.", STEP_BUCKETS
        )
        self.checkpoint_save_seconds = histogram(
            protocol.CHECKPOINT_SAVE_SECONDS,
            "Wall time of a checkpoint save (blocking part).",
            CHECKPOINT_BUCKETS,
        )
        self.checkpoint_load_seconds = histogram(
            protocol.CHECKPOINT_LOAD_SECONDS, "Wall time of a checkpoint load.", CHECKPOINT_BUCKETS
        )
        self.checkpoints_quarantined = gauge(
            protocol.CHECKPOINTS_QUARANTINED,
            "Damaged or incomplete checkpoints in checkpoint.dir/quarantine/ (moved there "
            "instead of loaded, never deleted), counted at start-up.",
        )

    def record_step(self, record: StepRecord) -> None:
        self.step.set(record.step)
        self.loss.set(record.loss)
        self.learning_rate.set(record.lr)
        self.grad_norm.set(record.grad_norm)
        self.tokens_per_second.set(record.tokens_per_second)
        self.samples_per_second.set(record.samples_per_second)
        self.mfu.set(record.mfu)
        self.step_seconds.observe(record.step_seconds)
        if record.validation_loss is not None:
            self.validation_loss.set(record.validation_loss)


def build_registry(job: str, namespace: str) -> tuple[CollectorRegistry, TrainerMetrics]:
    """A dedicated registry (no process/platform collectors) holding the trainer's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    return registry, TrainerMetrics(registry, job, namespace)


def metric_names() -> list[str]:
    """The metric family names the trainer exports (what dashboards and alerts may use)."""
    registry, _ = build_registry("x", "x")
    return sorted(m.name for m in registry.collect())


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Any:
    """Start the HTTP endpoint in a daemon thread; returns the server (call .shutdown())."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


# --- per-step record, log line, JSONL ---------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    step: int
    max_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float
    samples_per_second: float
    mfu: float
    step_seconds: float
    consumed_samples: int
    validation_loss: float | None = None  # set on the steps that evaluate

    def log_line(self) -> str:
        line = (
            f"step {self.step}/{self.max_steps} | loss {self.loss:.4f} | lr {self.lr:.3e} | "
            f"grad norm {self.grad_norm:.3f} | {self.tokens_per_second:,.0f} tok/s | "
            f"MFU {self.mfu * 100:.2f}% | {self.step_seconds:.3f} s/step"
        )
        if self.validation_loss is not None:
            line += f" | validation loss {self.validation_loss:.4f}"
        return line

    def json_line(self) -> str:
        # Floats are written with repr precision, so equal losses compare equal after a reload.
        # JSON has no NaN or infinity: such a value is written as null with a `<name>_non_finite`
        # word beside it, so strict parsers read the record and nothing is hidden.
        fields: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            word = protocol.non_finite_name(value) if isinstance(value, float) else None
            if word is not None:
                fields[f"{key}_non_finite"] = word
                value = None
            fields[key] = value
        return json.dumps(fields, sort_keys=True, allow_nan=False)


class JsonlLog:
    """Appends one JSON object per step; flushed each line so a killed run keeps its records."""

    def __init__(self, path: str | Path | None) -> None:
        self._handle: IO[str] | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives for the run

    def write(self, record: StepRecord) -> None:
        if self._handle is not None:
            self._handle.write(record.json_line() + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- FLOPs and MFU (pure) --------------------------------------------------------------------


def matmul_params(arch: Architecture) -> int:
    """Parameters that take part in matmuls: all but the input embedding lookup table."""
    head = arch.embedding_params()  # the output projection, tied or not, is a matmul
    return arch.num_layers * arch.layer_params() + arch.hidden_size + head


def flops_per_token(arch: Architecture, seq_length: int) -> float:
    """Forward + backward model FLOPs per trained token (see the module docstring)."""
    attention = 12 * arch.num_layers * arch.hidden_size * seq_length
    return 6.0 * matmul_params(arch) + attention


def mfu(tokens_per_second: float, flops_per_tok: float, peak_flops_total: float) -> float:
    if peak_flops_total <= 0:
        return 0.0
    return tokens_per_second * flops_per_tok / peak_flops_total


def peak_flops_total(
    peak_tflops_per_core: float | None, world_size: int, measured_per_rank: float | None
) -> float:
    """Peak FLOP/s of the whole job: catalogue figure if given, else the measured CPU figure."""
    if peak_tflops_per_core is not None:
        return peak_tflops_per_core * 1e12 * world_size
    return (measured_per_rank or 0.0) * world_size


def cpu_matmul_peaks(size: int = 512, repeats: int = 5, dtype: Any = None) -> dict[str, float]:
    """Best-of-n square matmul FLOP/s of each CPU matmul library, with this process's threads:
    ``torch.mm`` (its BLAS) and, for fp32, oneDNN, which the model's linears may use (see
    ``cpu_linear``; under bf16 ``torch.mm`` is oneDNN already)."""
    import torch

    from . import cpu_linear

    dtype = dtype or torch.float32
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    kernels: dict[str, Any] = {"torch.mm": torch.mm}
    if dtype == torch.float32 and cpu_linear.available():
        kernels["oneDNN"] = cpu_linear.mm_t
    peaks = {}
    for name, kernel in kernels.items():
        kernel(a, b)  # warm up the kernel choice and caches
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            kernel(a, b)
            best = min(best, time.perf_counter() - start)
        peaks[name] = 2.0 * size**3 / max(best, 1e-9)
    return peaks


@functools.cache
def measure_cpu_peak_flops(size: int = 512, repeats: int = 5) -> float:
    """fp32 matmul FLOP/s of this process, measured once: the faster library's, so MFU stays a
    fraction of what this CPU can do whichever library the step runs on."""
    return max(cpu_matmul_peaks(size, repeats).values())


def scrape_values(text: str) -> dict[str, float]:
    """Sample name -> value from a Prometheus text exposition (ignores labels; last wins)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values
