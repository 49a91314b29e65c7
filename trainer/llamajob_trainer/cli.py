"""Trainer-side commands: `llamajob train | compile | prepare-data | export-hf`.

Each `*_main(argv) -> int` parses its own arguments and returns the process exit code. A user
error (bad config, missing dataset, incompatible checkpoint, ...) prints one line naming the
field or file and the fix, writes the termination message with `"permanent": true` and returns
the protocol exit code; restarting cannot fix it. Any other failure is treated as transient:
traceback, termination message with `"permanent": false`, exit code 1. When torchrun restarts
the processes in place after such a permanent error, they exit with it again at once instead
of repeating the work that failed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import protocol
from .errors import ConfigError, DataError, DependencyError, TrainerUserError


class UsageError(TrainerUserError):
    exit_code = protocol.EXIT_USAGE
    reason = "Usage"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage with the protocol's EXIT_USAGE instead of exiting 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


_CONFIG_FILES = (
    "the job file (a LlamaTrainingJob YAML, e.g. examples/tiny.yaml) or the trainer config the "
    "operator renders from it (TrainerConfig YAML/JSON)"
)
_CONFIG_HELP = f"{_CONFIG_FILES}; default: ${protocol.CONFIG_ENV}"
_ACCEPTED = (
    "--config takes a LlamaTrainingJob file (kind: LlamaTrainingJob, e.g. examples/tiny.yaml) "
    "or a trainer config (the TrainerConfig YAML the operator renders from a job into its "
    "ConfigMap)"
)


# --- config ------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None) -> Any:
    """Read a TrainerConfig from YAML or JSON (camelCase, as `TrainerConfig.to_wire()` writes),
    or from a LlamaTrainingJob file, converted as the operator does for the job's ConfigMap."""
    import yaml
    from pydantic import ValidationError

    from .config import TrainerConfig

    if path is None:
        path = os.environ.get(protocol.CONFIG_ENV)
    if not path:
        raise UsageError(f"--config FILE is required (or set {protocol.CONFIG_ENV})")
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {file}: cannot read it ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {file}: not valid YAML/JSON{where}: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {file}: not a mapping; {_ACCEPTED}")
    if raw.get("kind") == "LlamaTrainingJob":
        return config_from_job_file(file)
    if "kind" in raw or "apiVersion" in raw:
        raise ConfigError(
            f"config file {file} is a {raw.get('kind') or 'Kubernetes object'} "
            f"(apiVersion {raw.get('apiVersion')!r}); {_ACCEPTED}"
        )
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"config file {file}: not a valid trainer config ({problems}); "
                          f"{_ACCEPTED}") from exc


def config_from_job_file(file: Path) -> Any:
    """The TrainerConfig the operator would render for this job file (same function)."""
    # The operator's modules (pydantic only, no torch), imported only for job files.
    from llamajob.jobfile import JobFileError, load_job
    from llamajob.plan import make_plan
    from llamajob.render import trainer_config

    try:
        job = load_job(file)
    except JobFileError as exc:
        raise ConfigError(f"job file {file}: {'; '.join(str(e) for e in exc.errors)}") from None
    plan = make_plan(job.spec)
    if not plan.valid:
        raise ConfigError(f"job file {file}: {'; '.join(str(p) for p in plan.problems())} "
                          "(`llamajob plan FILE` explains)")
    return trainer_config(job, plan)


# OS errors that no retry can fix: the path itself is wrong (too long, not a directory, a loop)
# or forbidden. EIO, ENOSPC, ESTALE, timeouts and the like stay retryable.
_PERMANENT_ERRNOS = frozenset({
    errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EACCES, errno.EPERM,
    errno.EROFS, errno.EINVAL,
})


def _as_user_error(exc: BaseException) -> TrainerUserError | None:
    """User errors raised by other modules under their own types, mapped to exit codes.

    Retries are for what a retry can fix. Damaged input (a file that does not unpickle or
    parse), a path the system refuses, a value too large for the library it reaches: each
    would fail the same way on every attempt, so each is permanent, with the file named."""
    if isinstance(exc, TrainerUserError):
        return exc
    from .parallel.layout import LayoutError

    if isinstance(exc, LayoutError):
        return ConfigError(str(exc))
    if getattr(exc, "exit_code", None) == protocol.EXIT_DEPENDENCY:
        return DependencyError(str(exc))
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        where = exc.filename if exc.filename is not None else "a path of the job"
        return ConfigError(f"{where}: {exc.strerror or exc}; fix the path in the job spec "
                           "(checkpoint.dir, data.path, compile.cacheDir, model.tokenizer)")
    if isinstance(exc, pickle.UnpicklingError | json.JSONDecodeError | UnicodeDecodeError):
        return DataError(f"damaged input file ({type(exc).__name__}: {exc}); replace or "
                         "remove it")
    if isinstance(exc, ValueError) and "null byte" in str(exc):
        return ConfigError(f"a path in the job spec contains a NUL byte ({exc})")
    if isinstance(exc, OverflowError) or (
        isinstance(exc, RuntimeError) and "Overflow when unpacking" in str(exc)
    ):
        return ConfigError(f"a number in the job spec is too large ({exc}); the seed must fit "
                           "in 64 bits")
    return None


def _local_rank0() -> bool:
    # One termination log per container: the first local process writes it.
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _run(prog: str, body: Callable[[], int]) -> int:
    earlier = protocol.earlier_permanent_failure(os.environ)
    if earlier is not None:
        print(f"{prog}: error (an earlier round of this process group; torchrun's in-place "
              f"restart cannot fix it): {earlier.get('message', earlier.get('reason'))}",
              file=sys.stderr, flush=True)
        return int(earlier["exitCode"])
    try:
        return body()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        user = _as_user_error(exc)
        if user is None:
            traceback.print_exc()
            if _local_rank0():
                protocol.write_termination_message(
                    reason="Error", permanent=False, message=f"{type(exc).__name__}: {exc}"[:2000]
                )
            return 1
        message = " ".join(str(user).split())  # one line, whatever the cause's formatting
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        if _local_rank0():
            protocol.write_termination_message(
                reason=user.reason, permanent=True, exitCode=user.exit_code, message=message[:2000]
            )
        return user.exit_code


# --- train -------------------------------------------------------------------------------------


def train_main(argv: list[str]) -> int:
    from .lifeline import die_with_launcher

    die_with_launcher()  # under `llamajob run`: no rank outlives its torchrun
    prog = "llamajob train"

    def body() -> int:
        ap = _Parser(prog=prog, description="Run one training rank (start it with torchrun).")
        ap.add_argument("--config", help=_CONFIG_HELP)
        ap.add_argument("--log-jsonl", metavar="PATH", help="append one JSON record per step")
        ap.add_argument("--chaos-kill-at-step", type=int, metavar="N",
                        help=f"SIGKILL rank 0 right after step N, once per job "
                        f"(or ${protocol.CHAOS_KILL_AT_STEP_ENV})")
        ap.add_argument("--chaos-kill-during-checkpoint", nargs="?", const=0, type=int,
                        metavar="STEP",
                        help="SIGKILL rank 0 inside a checkpoint write before `done`, once per "
                        "job: the next write, or the first at STEP or later "
                        f"(or ${protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV}=1|STEP)")
        ap.add_argument("--chaos-nan-at-step", type=int, metavar="N",
                        help="overwrite rank 0's parameters with NaN just before step N, once "
                        f"per job, to exercise divergence handling (or "
                        f"${protocol.CHAOS_NAN_AT_STEP_ENV})")
        args = ap.parse_args(argv)
        cfg = load_config(args.config)

        from .chaos import chaos_from
        from .errors import TrainingDiverged
        from .train import Terminated, TrainOptions, train

        chaos = chaos_from(args.chaos_kill_at_step, args.chaos_kill_during_checkpoint, os.environ,
                           args.chaos_nan_at_step)
        try:
            train(cfg, TrainOptions(log_jsonl=args.log_jsonl, chaos=chaos))
        except TrainingDiverged as diverged:
            message = str(diverged)
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
            if _local_rank0():
                protocol.write_termination_message(
                    reason=diverged.reason, permanent=False, exitCode=diverged.exit_code,
                    step=diverged.step, loss=diverged.loss, message=message[:2000],
                )
            return diverged.exit_code
        except Terminated as stop:
            print(f"{prog}: {stop}", file=sys.stderr, flush=True)
            if _local_rank0():
                protocol.write_termination_message(
                    reason="Terminated", permanent=False, message=str(stop)
                )
            return 128 + signal.SIGTERM
        return 0

    return _run(prog, body)


# --- compile -----------------------------------------------------------------------------------


def compile_main(argv: list[str]) -> int:
    from .lifeline import die_with_launcher

    die_with_launcher()  # under `llamajob run`: no rank outlives its torchrun
    prog = "llamajob compile"

    def body() -> int:
        ap = _Parser(prog=prog, description="Compile the job's graphs once per compile key "
                     "(neuron: under neuron_parallel_compile; torch: one validation step).")
        ap.add_argument("--config", help=_CONFIG_HELP)
        args = ap.parse_args(argv)
        cfg = load_config(args.config)

        from .compile import run_compile

        fields = run_compile(cfg)
        if _local_rank0():
            protocol.write_termination_message(**fields)
        return 0

    return _run(prog, body)


# --- prepare-data --------------------------------------------------------------------------------


def prepare_data_parser() -> argparse.ArgumentParser:
    from .data import BUILTIN_PYDOC

    ap = _Parser(
        prog="llamajob prepare-data",
        description="Tokenize text into fixed-length packed sequences for training. "
        f"Without --input it uses the built-in corpus ({BUILTIN_PYDOC}: the Python help "
        "topics shipped with every Python install). With --config JOB.yaml the output, "
        "sequence length and tokenizer default to the job's data.path, data.seqLength and "
        "model.tokenizer.",
    )
    ap.add_argument("--input", action="append", metavar="PATH",
                    help="text file (.txt/.md/.rst), .jsonl (field text), .parquet (column "
                    f"text) or a directory of them; repeatable (default {BUILTIN_PYDOC})")
    ap.add_argument("--output", metavar="DIR",
                    help="dataset directory (default: data.path of --config, else data/pydoc)")
    ap.add_argument("--tokenizer", metavar="SOURCE",
                    help="HF tokenizer.json (or a directory holding one), `byte` for the "
                    "built-in byte-level tokenizer, or a Hugging Face Hub model repo id such as "
                    "meta-llama/Meta-Llama-3-8B (its tokenizer.json is downloaded, with $HF_TOKEN "
                    "for gated models); default: model.tokenizer of --config, else byte")
    ap.add_argument("--save-tokenizer", metavar="PATH",
                    help="with a repo id for --tokenizer: where to keep the downloaded "
                    "tokenizer.json (a file path or a directory), which training must then use "
                    "as model.tokenizer; default: model.tokenizer of --config")
    ap.add_argument("--seq-length", type=int, metavar="N",
                    help="tokens per sequence (default: data.seqLength of --config, else 128)")
    ap.add_argument("--config", metavar="FILE",
                    help="take the defaults above from " + _CONFIG_FILES)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def prepare_data_main(argv: list[str]) -> int:
    prog = "llamajob prepare-data"

    def body() -> int:
        from .data import BUILTIN_PYDOC

        args = prepare_data_parser().parse_args(argv)
        cfg = load_config(args.config) if args.config else None
        output = args.output or (cfg.data.path if cfg else "data/pydoc")
        seq = args.seq_length or (cfg.data.seq_length if cfg else 128)
        if seq < 1:
            raise UsageError("--seq-length must be at least 1")
        job_tokenizer = cfg.model.tokenizer if cfg else None
        tok_spec = args.tokenizer or job_tokenizer

        from .data import prepare_data
        from .tokenizer import (
            download_hub_tokenizer,
            install_tokenizer,
            is_hub_repo_id,
            load_tokenizer,
        )

        if args.save_tokenizer and not is_hub_repo_id(tok_spec):
            raise UsageError("--save-tokenizer is for a tokenizer downloaded from the Hugging "
                             "Face Hub (--tokenizer ORG/NAME)")
        if is_hub_repo_id(tok_spec):
            assert tok_spec is not None
            downloaded = download_hub_tokenizer(tok_spec)
            keep = args.save_tokenizer or (
                job_tokenizer if job_tokenizer and not is_hub_repo_id(job_tokenizer) else None)
            if keep:
                tok_spec = str(install_tokenizer(downloaded, keep))
                print(f"tokenizer of {args.tokenizer or job_tokenizer} saved as {tok_spec}")
            else:
                tok_spec = str(downloaded / "tokenizer.json")
                print(f"tokenizer of {args.tokenizer} downloaded to {tok_spec}; point "
                      "model.tokenizer at a copy of it on the shared file system "
                      "(or pass --save-tokenizer)")
        tokenizer = load_tokenizer(tok_spec)
        meta = prepare_data(
            args.input or [BUILTIN_PYDOC], output, tokenizer, seq,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        print(
            f"wrote {meta['num_sequences']:,} sequences of {seq}+1 tokens "
            f"({meta['documents']:,} documents, tokenizer {meta['tokenizer']['identity']}, "
            f"vocab {meta['tokenizer']['vocab_size']:,}, {meta['dtype']}) to {output}"
        )
        return 0

    return _run(prog, body)


# --- export-hf ---------------------------------------------------------------------------------


def export_hf_main(argv: list[str]) -> int:
    prog = "llamajob export-hf"

    def body() -> int:
        ap = _Parser(prog=prog, description="Export a checkpoint as Hugging Face safetensors "
                     "+ config.json (loadable by transformers' LlamaForCausalLM).")
        ap.add_argument("--config", help=_CONFIG_HELP)
        ap.add_argument("--output", required=True, metavar="DIR", help="output directory")
        ap.add_argument("--checkpoint-dir", metavar="DIR",
                        help="default: checkpoint.dir of the config")
        ap.add_argument("--step", type=int, metavar="N", help="default: the newest complete one")
        ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        ap.add_argument("--platform", choices=["trn1", "trn2"],
                        help="where an nxd-backend checkpoint with kvReplicator > 1 was written "
                        "(NxD places the kv copies differently on each); default: as recorded")
        args = ap.parse_args(argv)
        cfg = load_config(args.config)

        from .hf import export_checkpoint

        out = export_checkpoint(
            args.checkpoint_dir or cfg.checkpoint.dir,
            args.step,
            cfg.model.architecture(),
            cfg.training_fingerprint(),
            args.output,
            dtype=args.dtype,
            tokenizer=cfg.model.tokenizer,
            platform=args.platform,
        )
        print(f"exported to {out}")
        return 0

    return _run(prog, body)


_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_main,
    "compile": compile_main,
    "prepare-data": prepare_data_main,
    "export-hf": export_hf_main,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        print(f"usage: python -m llamajob_trainer.cli {{{','.join(_COMMANDS)}}} ...",
              file=sys.stderr)
        sys.exit(protocol.EXIT_USAGE)
    sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
