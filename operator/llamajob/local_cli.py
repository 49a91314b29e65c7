"""`llamajob run FILE`: read and check the job, prepare the built-in dataset if needed, then run
it with the local shell (``local.py``) and print what happened (``local_console.py``)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from prometheus_client import start_http_server

from . import metrics as op_metrics
from .api import LlamaTrainingJob, LlamaTrainingJobStatus
from .catalogue import INSTANCE_TYPES
from .jobfile import JobFileError, load_job
from .local import (
    DirectoryInUse,
    LocalRunner,
    RunOptions,
    default_run_dir,
    free_port,
    lock_directory,
)
from .local_console import ConsoleUI, print_summary
from .plan import make_plan

EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
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
    # "-local" must still leave a valid name (a DNS subdomain of at most 253 characters).
    name = job.metadata.name[: 253 - len("-local")].rstrip("-.")
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
    ap.add_argument(
        "--builtin-corpus",
        action="store_true",
        help=f"when data.path does not exist, prepare the built-in corpus (Python's docs) "
        f"there; automatic only for data.path {BUILTIN_DATA_PATH}",
    )
    return ap


# The one path where `llamajob run` prepares the built-in corpus by itself: data.path's default,
# the path examples/tiny.yaml uses (relative to the working directory). Any other path must
# hold a prepared dataset, or the run is refused: a typo must not silently train on Python's
# docs. `--builtin-corpus` asks for the built-in corpus at another missing path.
BUILTIN_DATA_PATH = "data/pydoc"
_PREPARE_OUTPUTS = frozenset({"tokens.bin", "tokens.bin.tmp", "metadata.json.tmp"})


class DataProblem(Exception):
    """spec.data is unusable for a local run: one line, exit 2, nothing started."""


def is_builtin_data_path(path: str) -> bool:
    return os.path.normpath(path) == BUILTIN_DATA_PATH


def _prepare_hint(job: LlamaTrainingJob, path: Path) -> str:
    tok = job.spec.model.tokenizer
    tok_flag = f" --tokenizer {tok}" if tok else ""
    return (
        f"prepare it with `llamajob prepare-data --input YOUR_TEXT{tok_flag} --seq-length "
        f"{job.spec.data.seq_length} --output {path}` (see docs/data.md)"
    )


def check_dataset(job: LlamaTrainingJob, builtin: bool = False) -> bool:
    """Whether the built-in corpus must be prepared at data.path first; raises DataProblem
    when data.path cannot feed this job. Writes nothing."""
    raw = job.spec.data.path
    path = Path(raw)
    meta_path = path / "metadata.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            seq = int(meta["seq_length"])
            rows = int(meta.get("num_sequences", 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataProblem(
                f"spec.data.path: {meta_path} is not readable dataset metadata ({exc}); "
                f"{_prepare_hint(job, path)}"
            ) from None
        if seq != job.spec.data.seq_length:
            raise DataProblem(
                f"spec.data.seqLength: {job.spec.data.seq_length}, but the dataset in {path} "
                f"was prepared with --seq-length {seq}; set seqLength: {seq}, or prepare it "
                f"again: {_prepare_hint(job, path)}"
            )
        batch, held_out = job.spec.batch.global_batch_size, job.spec.validation.sequences
        if "num_sequences" in meta and rows < batch + held_out:
            need = f"one global batch ({batch})" + (
                f" plus validation.sequences ({held_out})" if held_out else "")
            raise DataProblem(
                f"spec.data.path: {path} holds {rows} sequences, fewer than {need}; add text "
                f"and prepare it again ({_prepare_hint(job, path)}), or lower "
                "batch.globalBatchSize" + (" or validation.sequences" if held_out else "")
            )
        return False
    wanted = builtin or is_builtin_data_path(raw)
    if path.exists() and not path.is_dir():
        raise DataProblem(
            f"spec.data.path: {raw} is a file, not a dataset directory; {_prepare_hint(job, path)}"
        )
    if path.is_dir():
        try:
            leftovers = {p.name for p in path.iterdir()}
        except OSError as exc:
            raise DataProblem(f"spec.data.path: cannot read {raw}: {exc.strerror}") from None
        # What an interrupted prepare-data leaves behind may be prepared again; anything else
        # is someone's data, and not a dataset.
        if wanted and leftovers <= _PREPARE_OUTPUTS:
            return _builtin_fits(job, path)
        what = "is empty" if not leftovers else "holds no prepared dataset (no metadata.json)"
        builtin_hint = "" if job.spec.model.tokenizer or wanted else (
            "; or, to train on the built-in corpus (Python's docs) there, run again with "
            "--builtin-corpus")
        raise DataProblem(f"spec.data.path: {raw} {what}; {_prepare_hint(job, path)}"
                          f"{builtin_hint}")
    if not wanted:
        raise DataProblem(
            f"spec.data.path: {raw} does not exist. Check the path, or {_prepare_hint(job, path)}"
            f"; only data.path {BUILTIN_DATA_PATH} (or `llamajob run --builtin-corpus`) gets "
            "the built-in corpus (Python's docs) prepared automatically"
        )
    return _builtin_fits(job, path)


def _builtin_fits(job: LlamaTrainingJob, path: Path) -> bool:
    """True, or DataProblem when the job's tokenizer is not the built-in corpus's."""
    if job.spec.model.tokenizer:
        raise DataProblem(
            f"spec.data.path: {path} holds no dataset, and the built-in corpus uses the "
            f"byte-level tokenizer, not model.tokenizer ({job.spec.model.tokenizer}); "
            f"{_prepare_hint(job, path)}"
        )
    return True


def prepare_builtin_corpus(job: LlamaTrainingJob, ui: ConsoleUI) -> int:
    """Tokenize the built-in corpus into data.path (a subprocess: the trainer's numpy)."""
    path = Path(job.spec.data.path)
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


def _lock_run(job: LlamaTrainingJob, job_file: str, run_dir: Path) -> tuple[int, ...]:
    """Locks the run directory and the checkpoint directory, or raises DirectoryInUse. The
    checkpoint directory is the resource two gangs must not share; it needs its own lock
    because another job file, or the same one with another --run-dir, can point at it."""
    holder = {"pid": os.getpid(), "job": job.metadata.name, "jobFile": job_file,
              "runDir": str(run_dir)}
    locks = [lock_directory(run_dir, holder)]
    ckpt_dir = Path(job.spec.checkpoint.dir)
    try:
        if ckpt_dir.resolve() != run_dir.resolve():
            locks.append(lock_directory(ckpt_dir, holder))
    except DirectoryInUse:
        os.close(locks[0])
        raise
    return tuple(locks)


def _in_use_message(exc: DirectoryInUse, run_dir: Path) -> str:
    """One line: which directory, who holds it, and what to do."""
    holder = exc.holder
    pid = holder.get("pid")
    what, fix = "run directory", "stop it first, or pass another --run-dir"
    details = f"pid {pid or '?'}"
    if exc.directory != run_dir:
        what = "checkpoint directory"
        fix = "two runs would write over each other's checkpoints; stop it first"
        details += f", run directory {holder.get('runDir', '?')}"
    who = f"`llamajob run` of job {holder.get('job', '?')} ({details})"
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            # torchrun inherited the lock: the run was killed and its ranks are still saving.
            who += ", which has exited while its training processes stop"
            fix = "run again in a few seconds, once they have"
        except PermissionError:
            pass  # alive, another user's
    return f"error: {what} {exc.directory} is in use by {who}; {fix}"


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


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
    if inst.family != "cpu":
        where = f"{inst.backend} backend"
        if inst.backend == "torch":
            where += f" on {inst.device}"
        print(
            f"{args.file} targets {job.spec.cluster.nodes} x {inst.name} (the {where}). "
            "Local runs use the torch backend on CPU (gloo).",
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
    try:
        prepare = check_dataset(job, builtin=args.builtin_corpus)
    except DataProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    run_dir = args.run_dir or default_run_dir(job.metadata.name)
    try:
        locks = _lock_run(job, args.file, run_dir)
    except DirectoryInUse as exc:
        print(_in_use_message(exc, run_dir), file=sys.stderr)
        return EXIT_INVALID
    if prepare:
        code = prepare_builtin_corpus(job, ui)
        if code:
            return code

    options = RunOptions(
        chaos_kill_at_step=args.chaos_kill_at_step,
        chaos_kill_during_checkpoint=args.chaos_kill_during_checkpoint,
        metrics_port=args.metrics_port,
        operator_metrics_port=args.operator_metrics_port,
        progress=not args.no_progress,
        run_dir=run_dir,
        # Held until this process and every torchrun it starts have exited.
        keep_open=locks,
    )
    runner = LocalRunner(job=job, options=options, ui=ui)
    op_port = options.operator_metrics_port or free_port()
    start_http_server(op_port, addr="127.0.0.1", registry=op_metrics.REGISTRY)
    ui.note(f"job {job.metadata.name}: {plan.world_size} processes, {job.spec.total_steps()} steps")
    ui.note(f"operator metrics  http://127.0.0.1:{op_port}/metrics")
    ui.note(f"trainer metrics   http://127.0.0.1:{runner.trainer_port}/metrics (rank 0)")

    started = time.monotonic()
    interrupted = False
    # SIGTERM, and SIGHUP when the terminal goes away, stop the run as Ctrl-C does. A SIGHUP
    # ignored on purpose (nohup) stays ignored.
    stop_signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stop_signals.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, _interrupt) for sig in stop_signals}
    try:
        status = runner.run()
    except KeyboardInterrupt:
        interrupted = True
        try:
            ui.close()
            ui.note(
                "interrupted: stopping all processes (a later run resumes from the newest "
                "complete checkpoint)"
            )
        finally:
            # After a hangup the terminal may be gone and printing fail: stop regardless.
            runner.stop_all()
        status = runner.job.status or LlamaTrainingJobStatus()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
