"""`llamajob run FILE`: the job lifecycle on one machine, children as local processes.

The local shell around the same pure core the operator uses: `reconcile()` decides, this module
only observes processes and carries out actions. A "pod" here is one `torchrun --standalone`
process tree (the whole node's ranks); Services and ConfigMaps become files in the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from llamajob_trainer import protocol
from prometheus_client import start_http_server
from rich.markup import escape

from . import metrics as op_metrics
from .actions import CreateObject, DeletePods, EmitEvent, RequeueAfter
from .api import LlamaTrainingJob, LlamaTrainingJobStatus
from .catalogue import INSTANCE_TYPES
from .jobfile import JobFileError, load_job
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

EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
POLL_SECONDS = 0.5
LOCAL_STOP_GRACE_MAX = 60
TERMINAL = {"Succeeded", "Failed"}


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
        """Stop the whole process group: torchrun and every rank it started."""
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


@dataclass
class RunOptions:
    chaos_kill_at_step: int | None = None
    chaos_kill_during_checkpoint: int | None = None  # 0: the next write; N: at step >= N
    metrics_port: int | None = None
    operator_metrics_port: int | None = None
    progress: bool = True
    run_dir: Path | None = None


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
        self.run_dir = self.options.run_dir or Path("runs") / name / "local"
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
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
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
        return {
            "job": self.job.metadata.name,
            "phase": status.phase,
            "message": status.message,
            "final_step": last.get("step", status.step),
            "max_steps": status.max_steps or self.job.spec.total_steps(),
            "final_loss": last.get("loss", status.loss),
            # Validation runs after the last step too, so its record holds the final figure.
            "final_validation_loss": last.get("validation_loss", status.validation_loss),
            "restarts": status.restarts,
            "process_restarts": status.process_restarts or 0,
            "faults": [f.model_dump(mode="json") for f in status.faults],
            "wall_seconds": round(wall, 2),
            "checkpoint_dir": str(ckpt_dir),
            "checkpoints": checkpoints,
            "events": [{"type": t, "reason": r, "message": m} for t, r, m in self.events],
        }


def last_record(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            last = json.loads(line)
    return last


# --- presentation ------------------------------------------------------------------------------
class ConsoleUI:
    """Phase lines, fault lines and a live progress bar (plain lines when not on a terminal)."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        self.live = enabled and self.console.is_terminal
        self.bar: Any = None
        self.task: Any = None
        self.last_plain = 0.0
        self.last_plain_step: int | None = None

    def note(self, text: str) -> None:
        self.console.print(f"[dim]{_clock()}  {escape(text)}[/dim]")

    def event(self, type_: str, reason: str, message: str) -> None:
        style = "yellow" if type_ == "Warning" else "cyan"
        self.console.print(f"{_clock()}  [{style}]{reason:<16}[/{style}] {escape(message)}")

    def phase(self, status: LlamaTrainingJobStatus) -> None:
        self.console.print(
            f"{_clock()}  [bold]phase -> {status.phase}[/bold]"
            # Messages quote pod logs (e.g. "[.../pair.cc:152] ..."), which are not markup.
            + (f"  ({escape(status.message)})" if status.message else "")
        )

    def _fields(self, s: LlamaTrainingJobStatus) -> str:
        parts = [f"loss {s.loss:.4f}" if s.loss is not None else "loss -"]
        if s.validation_loss is not None:
            parts.append(f"validation {s.validation_loss:.4f}")
        parts.append(f"{s.tokens_per_second:,.0f} tok/s" if s.tokens_per_second else "- tok/s")
        parts.append(f"MFU {s.mfu:.1%}" if s.mfu is not None else "MFU -")
        if s.eta_seconds is not None:
            parts.append(f"ETA {s.eta_seconds:,.0f}s")
        return "  ".join(parts)

    def update(self, s: LlamaTrainingJobStatus) -> None:
        total = s.max_steps or 0
        step = s.step or 0
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            if self.bar is None and s.phase in {"Training", "Restarting"} and total:
                self.bar = Progress(
                    TextColumn("{task.fields[phase]:<10}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"),
                    console=self.console,
                    transient=False,
                )
                self.bar.start()
                self.task = self.bar.add_task("train", total=total, phase=s.phase, info="")
            if self.bar is not None:
                self.bar.update(self.task, completed=step, phase=s.phase, info=self._fields(s))
            return
        now = time.monotonic()
        fresh = s.step != self.last_plain_step
        if s.phase == "Training" and s.step is not None and fresh and now - self.last_plain >= 5:
            self.last_plain, self.last_plain_step = now, s.step
            self.console.print(f"{_clock()}  step {step}/{total}  {self._fields(s)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


# --- command line ----------------------------------------------------------------------------
SCALED_DOWN_STEPS = 50


def scaled_down(job: LlamaTrainingJob) -> LlamaTrainingJob:
    """The same model family shrunk to a CPU-sized run: depth, width and data scaled down,
    grouped-query ratio, RoPE base and vocabulary style kept; one node, two processes."""
    spec = job.spec
    arch = spec.model.architecture()
    group = max(1, arch.num_heads // arch.num_kv_heads)
    heads = 4 if group <= 4 else group
    wire = spec.to_wire()
    wire["model"] = {
        "preset": "tiny",
        "numHeads": heads,
        "numKvHeads": max(1, heads // group),
        "hiddenSize": 32 * heads,
        "intermediateSize": 96 * heads,
        "ropeTheta": arch.rope_theta,
    }
    wire["data"] = {"path": "data/pydoc", "seqLength": 128}
    wire["parallelism"] = {
        "tensor": 1,
        "pipeline": 1,
        "zero1": False,
        "sequenceParallel": False,
        "activationCheckpointing": "none",
    }
    wire["batch"] = {"microBatchSize": 8, "globalBatchSize": 16}
    wire["maxSteps"] = SCALED_DOWN_STEPS
    wire.pop("maxTokens", None)
    wire["precision"] = "fp32"
    wire["backend"] = "auto"
    name = job.metadata.name
    wire["checkpoint"] = {"dir": f"runs/{name}-local/checkpoints", "everySteps": 10, "keep": 2}
    wire["compile"] = {"enabled": True, "cacheDir": f"runs/{name}-local/compile-cache", "steps": 1}
    wire["cluster"] = {"nodes": 1, "instanceType": "cpu", "processesPerNode": 2}
    restart = wire.get("restartPolicy", {})
    restart.update(backoffSeconds=1, hangTimeoutSeconds=120)
    wire["restartPolicy"] = restart
    return LlamaTrainingJob.model_validate(
        {
            "apiVersion": job.api_version,
            "kind": job.kind,
            "metadata": {"name": f"{name}-local"},
            "spec": wire,
        }
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamajob run",
        description="Run a LlamaTrainingJob on this machine: validate, compile, train with "
        "checkpoints and auto-resume, on CPU with torchrun + gloo. Same decisions as the operator.",
    )
    ap.add_argument("file", help="job YAML")
    ap.add_argument(
        "--chaos-kill-at-step",
        type=int,
        metavar="N",
        help="kill a training process right after step N, once, to show auto-resume",
    )
    ap.add_argument(
        "--chaos-kill-during-checkpoint",
        nargs="?",
        const=0,
        type=int,
        metavar="STEP",
        help="kill a training process in the middle of a checkpoint write, once: the first "
        "write, or the first at STEP or later",
    )
    ap.add_argument(
        "--scale-down",
        action="store_true",
        help="for a Trainium job: run the same model family scaled down to CPU size",
    )
    ap.add_argument("--summary-json", type=Path, metavar="PATH", help="write the summary as JSON")
    ap.add_argument("--metrics-port", type=int, help="trainer metrics port (default: a free one)")
    ap.add_argument(
        "--operator-metrics-port", type=int, help="operator-side metrics port (default: a free one)"
    )
    ap.add_argument("--no-progress", action="store_true", help="plain lines, no live bar")
    ap.add_argument("--run-dir", type=Path, help="logs and scratch (default runs/<job>/local)")
    return ap


def ensure_dataset(job: LlamaTrainingJob, ui: ConsoleUI) -> int:
    """Prepare the built-in corpus when the job points at a dataset that does not exist yet."""
    path = Path(job.spec.data.path)
    if (path / "metadata.json").exists() or path.exists():
        return 0
    if job.spec.model.tokenizer:
        ui.console.print(
            f"[red]error[/red]: spec.data.path: {path} does not exist; create it with "
            "`llamajob prepare-data --tokenizer ... --output ...`"
        )
        return protocol.EXIT_DATA
    ui.note(f"dataset {path} missing: preparing the built-in corpus (Python's own docs)")
    argv = [
        sys.executable,
        "-m",
        "llamajob.cli",
        "prepare-data",
        "--output",
        str(path),
        "--seq-length",
        str(job.spec.data.seq_length),
    ]
    return subprocess.run(argv, check=False).returncode


def print_summary(ui: ConsoleUI, summary: dict[str, Any]) -> None:
    c = ui.console
    style = "green" if summary["phase"] == "Succeeded" else "red"
    c.print()
    c.print(
        f"[bold]Job {summary['job']}[/bold]: [{style}]{summary['phase']}[/{style}]"
        + (f" ({escape(summary['message'])})" if summary.get("message") else "")
    )
    loss = summary["final_loss"]
    c.print(f"  steps       {summary['final_step']}/{summary['max_steps']}")
    c.print(f"  final loss  {loss:.4f}" if loss is not None else "  final loss  -")
    if (validation := summary.get("final_validation_loss")) is not None:
        c.print(f"  validation  {validation:.4f}")
    c.print(f"  restarts    {summary['restarts']}")
    c.print(f"  wall time   {summary['wall_seconds']:.1f} s")
    kept = ", ".join(summary["checkpoints"]) or "none"
    c.print(f"  checkpoints {kept} (in {summary['checkpoint_dir']})")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    ui = ConsoleUI(enabled=not args.no_progress)
    try:
        job = load_job(args.file)
    except JobFileError as exc:
        for e in exc.errors:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    if job.spec.suspend:
        print(
            f"error: spec.suspend: {args.file} is suspended, so nothing would run; set it to "
            "false to run it (a local run stops with Ctrl-C and resumes when run again)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    inst = INSTANCE_TYPES[job.spec.cluster.instance_type]
    if inst.trainium:
        print(
            f"{args.file} targets {job.spec.cluster.nodes} x {inst.name} (the neuron backend). "
            "Local runs use the CPU backend (torch + gloo).",
            file=sys.stderr,
        )
        if not args.scale_down:
            print(
                "Re-run with --scale-down to run the same model family scaled down to CPU "
                "size, or use `llamajob plan` to check the full-size job.",
                file=sys.stderr,
            )
            return EXIT_INVALID
        job = scaled_down(job)
        ui.note(f"scaled down to {job.metadata.name}: see `llamajob run --help`")
    plan = make_plan(job.spec)
    if not plan.valid:
        for problem in plan.problems():
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID
    code = ensure_dataset(job, ui)
    if code:
        return code

    options = RunOptions(
        chaos_kill_at_step=args.chaos_kill_at_step,
        chaos_kill_during_checkpoint=args.chaos_kill_during_checkpoint,
        metrics_port=args.metrics_port,
        operator_metrics_port=args.operator_metrics_port,
        progress=not args.no_progress,
        run_dir=args.run_dir,
    )
    runner = LocalRunner(job=job, options=options, ui=ui)
    op_port = options.operator_metrics_port or free_port()
    start_http_server(op_port, addr="127.0.0.1", registry=op_metrics.REGISTRY)
    ui.note(f"job {job.metadata.name}: {plan.world_size} processes, {job.spec.total_steps()} steps")
    ui.note(f"operator metrics  http://127.0.0.1:{op_port}/metrics")
    ui.note(f"trainer metrics   http://127.0.0.1:{runner.trainer_port}/metrics (rank 0)")

    started = time.monotonic()
    interrupted = False
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        status = runner.run()
    except KeyboardInterrupt:
        interrupted = True
        ui.close()
        ui.note(
            "interrupted: stopping all processes (a later run resumes from the newest "
            "complete checkpoint)"
        )
        runner.stop_all()
        status = runner.job.status or LlamaTrainingJobStatus()
    finally:
        signal.signal(signal.SIGTERM, previous)
        ui.close()
    summary = runner.summary(time.monotonic() - started)
    if interrupted:
        summary["phase"] = "Interrupted"
    print_summary(ui, summary)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2))
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if status.phase == "Succeeded" else 1
