"""The contract between the trainer process and whoever supervises it (operator or local runner).

Pure Python, no torch: exit codes, the termination message, environment variables, file names
and metric names. Both shells read the trainer through these and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# --- exit codes -----------------------------------------------------------------------------
# Permanent: a bug in the job itself. Restarting cannot help, so supervisors fail the job.
EXIT_USAGE = 64  # bad command line (sysexits EX_USAGE)
EXIT_DATA = 65  # dataset missing, unreadable or too small (EX_DATAERR)
EXIT_CONFIG = 78  # invalid config, tokenizer, checkpoint mismatch (EX_CONFIG)
EXIT_DEPENDENCY = 79  # a required package (e.g. the Neuron SDK) is not installed
PERMANENT_EXIT_CODES = frozenset({EXIT_USAGE, EXIT_DATA, EXIT_CONFIG, EXIT_DEPENDENCY})
# A non-finite loss or gradient norm: neither permanent nor retryable by itself. The job's
# restartPolicy.onDivergence decides (Fail, or Rollback to the newest checkpoint).
EXIT_DIVERGED = 80
REASON_DIVERGED = "TrainingDiverged"
# Everything else (1, 137 = SIGKILL/OOM-kill, 143 = SIGTERM, ...) is retryable.

# --- termination message ----------------------------------------------------------------------
# torchrun turns any worker failure into exit code 1, so the cause travels out of band: the
# trainer writes one JSON object to this file (Kubernetes shows it as the container's
# terminationMessage). Keys: "reason" (str), "permanent" (bool), "message" (str), for a
# permanent error "exitCode" (int), for a divergence (reason REASON_DIVERGED) "step" (int),
# and for the compile step "compileCached" (bool) and "compileKey" (str).
TERMINATION_LOG_ENV = "LLAMAJOB_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))


def write_termination_message(**fields: Any) -> None:
    """Best effort: a read-only or missing termination log never hides the real error."""
    path = termination_log_path()
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(fields, sort_keys=True))


def parse_termination_message(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def earlier_permanent_failure(environ: Mapping[str, str]) -> dict[str, Any] | None:
    """The permanent error an earlier torchrun round in this container recorded, if any.

    torchrun restarts all local workers after any failure (``--max-restarts``) and cannot be told
    that some exit codes are final. A restarted worker that finds such a record in the container's
    termination log exits with it at once, so the remaining rounds cost seconds instead of
    repeating the failure. The log starts empty with each container (and each local attempt), so
    a record in it at a restart comes from this gang's own earlier round.
    """
    try:
        restarted = int(environ.get(TORCHELASTIC_RESTART_COUNT_ENV, "0")) > 0
    except ValueError:
        return None
    if not restarted:
        return None
    try:
        text = termination_log_path().read_text()
    except OSError:
        return None
    record = parse_termination_message(text)
    if record.get("permanent") is not True or record.get("exitCode") not in PERMANENT_EXIT_CODES:
        return None
    return record


# --- environment --------------------------------------------------------------------------------
CONFIG_ENV = "LLAMAJOB_CONFIG"  # path of the TrainerConfig YAML
CHAOS_KILL_AT_STEP_ENV = "LLAMAJOB_CHAOS_KILL_AT_STEP"
CHAOS_KILL_DURING_CHECKPOINT_ENV = "LLAMAJOB_CHAOS_KILL_DURING_CHECKPOINT"
CHAOS_NAN_AT_STEP_ENV = "LLAMAJOB_CHAOS_NAN_AT_STEP"
TORCHELASTIC_RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun: 0, 1, ...
DEFAULT_METRICS_PORT = 9400

# --- files ------------------------------------------------------------------------------------
CHECKPOINT_DONE_MARKER = "done"
CHECKPOINT_PREFIX = "step_"
COMPILE_MARKER_DIR = "llamajob-compile"
CHAOS_MARKER = ".llamajob-chaos-fired"  # in the checkpoint dir: inject each fault once per job


def compile_key(
    *,
    arch: dict[str, Any],
    layout: dict[str, Any],
    seq_length: int,
    micro_batch_size: int,
    precision: str,
    backend: str,
    image: str | None,
    device: str | None = None,
) -> str:
    """Identity of a compiled graph set: what changes the graphs changes the key. ``device``: the
    resolved device type (cpu, cuda, neuron); Inductor's CPU and CUDA graphs and TorchNeuron's
    NEFFs are different artefacts even for the same model and layout."""
    payload = {
        "arch": arch,
        "layout": layout,
        "seq": seq_length,
        "mbs": micro_batch_size,
        "precision": precision,
        "backend": backend,
        "image": image or "",
    }
    if device is not None:
        payload["device"] = device
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def compile_marker_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / COMPILE_MARKER_DIR / f"{key}.json"


# --- metrics ------------------------------------------------------------------------------------
# Trainer metrics (rank 0), all labelled job and namespace. The operator reads the first five
# into the job's status; dashboards and alerts use them all.
TRAIN_STEP = "llamajob_train_step"
TRAIN_LOSS = "llamajob_train_loss"
TRAIN_TOKENS_PER_SECOND = "llamajob_train_tokens_per_second"
TRAIN_MFU = "llamajob_train_mfu"
LAST_CHECKPOINT_STEP = "llamajob_last_checkpoint_step"
TRAIN_GRAD_NORM = "llamajob_train_grad_norm"
TRAIN_LEARNING_RATE = "llamajob_train_learning_rate"
TRAIN_SAMPLES_PER_SECOND = "llamajob_train_samples_per_second"
TRAIN_MAX_STEPS = "llamajob_train_max_steps"
VALIDATION_LOSS = "llamajob_validation_loss"
TRAIN_PROCESS_RESTARTS = "llamajob_train_process_restarts"
TRAIN_STEP_SECONDS = "llamajob_train_step_seconds"  # histogram
CHECKPOINT_SAVE_SECONDS = "llamajob_checkpoint_save_seconds"  # histogram
CHECKPOINT_LOAD_SECONDS = "llamajob_checkpoint_load_seconds"  # histogram
CHECKPOINTS_QUARANTINED = "llamajob_checkpoints_quarantined"


def non_finite_name(value: float) -> str | None:
    """"nan", "inf" or "-inf" for a non-finite float, None for a finite one (JSON has no
    spelling for them, so records carry null plus this word)."""
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return None
