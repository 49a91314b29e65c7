"""The local shell behind `llamajob run FILE`: the job lifecycle on one machine, children as local
processes (the command itself is ``local_cli.py``, its output ``local_console.py``).

The same pure core the operator uses: `reconcile()` decides, this module only observes processes
and carries out actions. A "pod" here is one `torchrun --standalone` process tree (the whole
node's ranks); Services and ConfigMaps become files in the run directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from llamajob_trainer import lifeline, protocol

from . import metrics as op_metrics
from .actions import CreateObject, DeletePods, EmitEvent, RequeueAfter
from .api import LlamaTrainingJob, LlamaTrainingJobStatus
from .observed import Observed, ObservedPod, Progress
from .plan import make_plan
from .progress import ScrapeError, parse_progress
from .reconcile import reconcile
from .render import (
    DISABLE_SHARED_STORE_ENV,
    SHUTDOWN_TIMEOUT_ENV,
    elastic,
    shutdown_timeout,
    trainer_config,
)

POLL_SECONDS = 0.5
LOCAL_STOP_GRACE_MAX = 60
TERMINAL = {"Succeeded", "Failed"}
LOCK_FILE = ".llamajob-run.lock"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    """One local 'pod': a torchrun process group for one node's ranks."""

    name: str
    role: str
    attempt: int
    rank: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    termination_path: Path
    deleting: bool = False

    def observe(self) -> ObservedPod:
        code = self.proc.poll()
        # A negative code is death by signal; Kubernetes reports 128 + signal.
        exit_code = None if code is None else (128 - code if code < 0 else code)
        message: dict[str, Any] = {}
        if code is not None and self.termination_path.exists():
            message = protocol.parse_termination_message(self.termination_path.read_text())
        return observed_pod_from_process(
            name=self.name,
            role=self.role,
            attempt=self.attempt,
            rank=self.rank,
            exit_code=exit_code,
            termination_message=message,
            deleting=self.deleting,
        )

    def stop(self, grace: float = 10.0) -> None:
        """Stop torchrun and every rank it started: torchrun forwards SIGTERM to the ranks (each
        in a session of its own), and if it has to be SIGKILLed they die with it (lifeline)."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=grace)


def observed_pod_from_process(
    *,
    name: str,
    role: str,
    attempt: int,
    rank: int,
    exit_code: int | None,
    termination_message: dict[str, Any],
    deleting: bool = False,
) -> ObservedPod:
    """What the Kubernetes shell would observe for a pod whose container behaved like this."""
    if exit_code is None:
        phase, reason = "Running", None
    elif exit_code == 0:
        phase, reason = "Succeeded", "Completed"
    else:
        phase, reason = "Failed", "Error"
    return ObservedPod(
        name=name,
        role=role,
        attempt=attempt,
        rank=rank,
        phase=phase,
        node="localhost",
        exit_code=exit_code,
        reason=reason,
        termination_message=termination_message,
        deleting=deleting,
        ip="127.0.0.1",
    )


def default_run_dir(job_name: str) -> Path:
    return Path("runs") / job_name / "local"


class DirectoryInUse(Exception):
    """Another run holds the lock on a directory; `holder` is what it wrote there."""

    def __init__(self, directory: Path, holder: dict[str, Any]) -> None:
        super().__init__(f"{directory} is in use (held by {holder or 'an unknown process'})")
        self.directory = directory
        self.holder = holder


def lock_directory(directory: Path, holder: dict[str, Any]) -> int:
    """Lock `directory` for this run, or raise DirectoryInUse. Returns the lock's descriptor.

    An flock, not a pid file: the kernel drops it when the last descriptor to it closes, so a
    SIGKILLed run never leaves a stale lock. torchrun inherits the descriptor (RunOptions
    .keep_open), so the lock lasts until the training processes have exited too, not just
    `llamajob run`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        try:
            found = json.loads(text)
        except ValueError:
            found = {}  # the holder has not written it yet
        raise DirectoryInUse(directory, found if isinstance(found, dict) else {}) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


@dataclass
class RunOptions:
    chaos_kill_at_step: int | None = None
    chaos_kill_during_checkpoint: int | None = None  # 0: the next write; N: at step >= N
    metrics_port: int | None = None
    operator_metrics_port: int | None = None
    progress: bool = True
    run_dir: Path | None = None
    # Descriptors every torchrun inherits: the run's directory locks.
    keep_open: tuple[int, ...] = ()


@dataclass
class LocalRunner:
    job: LlamaTrainingJob
    options: RunOptions
    ui: Any
    children: dict[str, Child] = field(default_factory=dict)
    service: bool = False
    configmaps: set[str] = field(default_factory=set)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    progress: Progress | None = None
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        name = self.job.metadata.name
        self.run_dir = self.options.run_dir or default_run_dir(name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tmpdir = self.run_dir / "tmp"
        self.tmpdir.mkdir(exist_ok=True)
        self.plan = make_plan(self.job.spec)
        self.trainer_port = self.options.metrics_port or free_port()
        self.config_path = self.run_dir / "trainer-config.yaml"
        # One record per step across attempts: the summary's final step and loss come from here,
        # because the last metrics scrape can miss the final steps.
        self.steps_path = self.run_dir / "steps.jsonl"
        self.steps_path.unlink(missing_ok=True)

    # --- observing ------------------------------------------------------------------------
    def observe(self) -> Observed:
        pods = tuple(child.observe() for child in self.children.values())
        return Observed(
            pods=pods,
            nodes={},
            progress=self.progress,
            service=self.service,
            configmaps=frozenset(self.configmaps),
        )

    def scrape(self) -> None:
        running = [c for c in self.children.values() if c.role == "train" and not c.deleting]
        if not running:
            return
        url = f"http://127.0.0.1:{self.trainer_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                text = resp.read().decode(errors="replace")
            progress = parse_progress(text, now=datetime.now(UTC))
        except (OSError, ScrapeError):
            return  # not up yet, or between attempts: keep the last reading
        if progress is not None:
            self.progress = progress

    # --- acting -------------------------------------------------------------------------------
    def apply(self, actions: tuple[Any, ...]) -> float | None:
        requeue: float | None = None
        for action in actions:
            if isinstance(action, CreateObject):
                self.create(action.manifest)
            elif isinstance(action, DeletePods):
                for name in action.names:
                    child = self.children.get(name)
                    if child is not None:
                        child.deleting = True
                        grace = action.grace_seconds
                        child.stop(self.stop_grace if grace is None else grace)
                        del self.children[name]
            elif isinstance(action, EmitEvent):
                self.events.append((action.type, action.reason, action.message))
                self.ui.event(action.type, action.reason, action.message)
            elif isinstance(action, RequeueAfter):
                requeue = action.seconds if requeue is None else min(requeue, action.seconds)
        return requeue

    def create(self, manifest: dict[str, Any]) -> None:
        kind = manifest.get("kind")
        if kind == "Service":
            self.service = True  # torchrun --standalone needs no rendezvous service
        elif kind == "ConfigMap":
            self.write_config()
            self.configmaps.add(manifest["metadata"]["name"])
        elif kind == "Pod":
            meta = manifest["metadata"]
            labels = meta.get("labels", {})
            name = meta["name"]
            if name in self.children:
                return
            self.children[name] = self.spawn(
                name,
                role=labels["llamajob.dev/role"],
                attempt=int(labels["llamajob.dev/attempt"]),
                rank=int(labels["llamajob.dev/rank"]),
            )
            op_metrics.PODS_CREATED.inc()

    def write_config(self) -> None:
        cfg = trainer_config(self.job, self.plan)
        cfg.metrics_port = self.trainer_port
        self.config_path.write_text(yaml.safe_dump(cfg.to_wire(), sort_keys=False))

    def spawn(self, name: str, *, role: str, attempt: int, rank: int) -> Child:
        attempt_dir = self.run_dir / f"attempt-{attempt}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        log_path = attempt_dir / f"{role}.log"
        term_path = attempt_dir / f"{role}.termination.json"
        term_path.unlink(missing_ok=True)
        command = "train" if role == "train" else "compile"
        # One node, so the standalone rendezvous restarts in place as c10d does in a cluster.
        restarts = self.job.spec.restart_policy.process_restarts if elastic(self.job, role) else 0
        argv = [
            sys.executable,
            "-m",
            "llamajob_trainer.lifeline",  # dies with this process, then execs torchrun
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(self.plan.processes_per_node),
            "--max-restarts",
            str(restarts),
            "-m",
            "llamajob.cli",
            command,
            "--config",
            str(self.config_path),
        ]
        if role == "train":
            argv += ["--log-jsonl", str(self.steps_path)]
        env = dict(os.environ)
        env.update(
            {
                "TMPDIR": str(self.tmpdir),
                protocol.TERMINATION_LOG_ENV: str(term_path),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                "PYTHONUNBUFFERED": "1",
                SHUTDOWN_TIMEOUT_ENV: str(shutdown_timeout(self.stop_grace)),
                lifeline.PARENT_ENV: str(os.getpid()),
            }
        )
        if restarts:
            # As in the cluster: a fresh store per rendezvous round, so the restarted
            # processes never read the previous round's addresses.
            env[DISABLE_SHARED_STORE_ENV] = "1"
        if role == "train":
            if self.options.chaos_kill_at_step is not None:
                env[protocol.CHAOS_KILL_AT_STEP_ENV] = str(self.options.chaos_kill_at_step)
            at = self.options.chaos_kill_during_checkpoint
            if at is not None:
                env[protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV] = str(at) if at > 1 else "1"
        log = log_path.open("ab")
        try:
            # A session of its own: stop() signals its group, and a Ctrl-C at the terminal
            # reaches only us, who stop it in order.
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                pass_fds=self.options.keep_open,
            )
        finally:
            log.close()
        self.ui.note(
            f"started {role} attempt {attempt} ({self.plan.processes_per_node} ranks), "
            f"log {log_path}"
        )
        return Child(name, role, attempt, rank, proc, log_path, term_path)

    @property
    def stop_grace(self) -> int:
        # The pod's grace period, capped: here a person waits at the terminal, and local
        # checkpoints are small.
        return min(self.job.spec.checkpoint.terminate_grace_seconds, LOCAL_STOP_GRACE_MAX)

    def stop_all(self) -> None:
        for child in list(self.children.values()):
            child.deleting = True
            child.stop(self.stop_grace)

    # --- the loop -------------------------------------------------------------------------------
    def step(self) -> float | None:
        now = datetime.now(UTC)
        self.scrape()
        started = time.perf_counter()
        decision = reconcile(self.job, self.observe(), now)
        op_metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
        old = self.job.status or LlamaTrainingJobStatus()
        self.job = self.job.model_copy(update={"status": decision.status})
        if decision.status.phase != old.phase:
            self.ui.phase(decision.status)
        if decision.status.restarts > old.restarts:
            op_metrics.JOB_RESTARTS.labels(job=self.job.metadata.name, namespace="local").inc()
        op_metrics.set_job_phases([("local", decision.status.phase or "Pending")])
        requeue = self.apply(decision.actions)
        self.ui.update(decision.status)
        return requeue

    def run(self) -> LlamaTrainingJobStatus:
        while True:
            requeue = self.step()
            status = self.job.status
            assert status is not None
            if status.phase in TERMINAL and not any(
                c.proc.poll() is None for c in self.children.values()
            ):
                return status
            time.sleep(min(POLL_SECONDS, requeue) if requeue else POLL_SECONDS)

    def summary(self, wall: float) -> dict[str, Any]:
        status = self.job.status or LlamaTrainingJobStatus()
        ckpt_dir = Path(self.job.spec.checkpoint.dir)
        checkpoints = (
            sorted(
                (
                    p.name
                    for p in ckpt_dir.glob(f"{protocol.CHECKPOINT_PREFIX}*")
                    if (p / protocol.CHECKPOINT_DONE_MARKER).exists()
                ),
                key=lambda n: int(n.split("_")[-1]),
            )
            if ckpt_dir.exists()
            else []
        )
        last = last_record(self.steps_path)
        return finite_json({
            "job": self.job.metadata.name,
            "phase": status.phase,
            "message": status.message,
            "final_step": last.get("step", status.step),
            "max_steps": status.max_steps or self.job.spec.total_steps(),
            "final_loss": last.get("loss", status.loss),
            # null loss with this word when the run diverged (JSON has no NaN).
            "final_loss_non_finite": (
                last.get("loss_non_finite") if last else status.loss_non_finite
            ),
            # Validation runs after the last step too, so its record holds the final figure.
            "final_validation_loss": last.get("validation_loss", status.validation_loss),
            "restarts": status.restarts,
            "process_restarts": status.process_restarts or 0,
            "faults": [f.model_dump(mode="json") for f in status.faults],
            "wall_seconds": round(wall, 2),
            "checkpoint_dir": str(ckpt_dir),
            "checkpoints": checkpoints,
            "events": [{"type": t, "reason": r, "message": m} for t, r, m in self.events],
        })


def finite_json(value: Any) -> Any:
    """The value with every non-finite float as None: strict JSON parsers refuse NaN and
    Infinity, and the summary says a diverged loss in words (`final_loss_non_finite`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def last_record(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            last = json.loads(line)
    return last
