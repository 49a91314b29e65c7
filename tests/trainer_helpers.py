"""Shared helpers for the trainer tests: tiny configs, datasets and bounded subprocess runs.

Training runs are real: `torchrun --standalone` (or a plain single process) on CPU with gloo,
each with its own TMPDIR, one intra-op thread per rank and a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from llamajob_trainer import protocol
from llamajob_trainer.cpu_linear import ENV_VAR as CPU_MATMUL_ENV
from llamajob_trainer.data import BUILTIN_PYDOC, prepare_data
from llamajob_trainer.tokenizer import ByteTokenizer

SEQ = 64
# Smaller than the `tiny` preset (same family, same vocabulary) so that a few dozen steps on
# two shared cores take seconds.
MODEL = {
    "preset": "tiny",
    "hiddenSize": 64,
    "numLayers": 2,
    "numHeads": 4,
    "numKvHeads": 2,
    "intermediateSize": 192,
}


def prepare_pydoc(path: Path, seq_length: int = SEQ) -> Path:
    prepare_data([BUILTIN_PYDOC], path, ByteTokenizer(), seq_length, progress=False)
    return path


def tiny_config(data: Path, ckpt: Path, /, **overrides: Any) -> dict[str, Any]:
    """A TrainerConfig in wire form; nested dicts in `overrides` are merged one level deep."""
    cfg: dict[str, Any] = {
        "model": dict(MODEL),
        "data": {"path": str(data), "seqLength": SEQ},
        "batch": {"microBatchSize": 2, "globalBatchSize": 8},
        "optimizer": {"lr": 3e-3, "minLr": 3e-4, "warmupSteps": 3},
        "maxSteps": 16,
        "precision": "fp32",
        "seed": 7,
        "checkpoint": {"dir": str(ckpt), "everySteps": 4, "keep": 2},
        "compile": {"cacheDir": str(ckpt.parent / "compile-cache")},
        "metricsPort": 0,
        "jobName": "tiny",
        "namespace": "tests",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trainer_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "TMPDIR": str(tmpdir),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            protocol.TERMINATION_LOG_ENV: str(tmp / "termination.json"),
            # Pinned rather than timed: fresh runs are compared bit for bit across separate
            # processes, and a timed choice (auto) could differ between them. oneDNN keeps its
            # path exercised end to end as before; tests of the timed choice remove this.
            CPU_MATMUL_ENV: "onednn",
        }
    )
    for name in (protocol.CHAOS_KILL_AT_STEP_ENV, protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV):
        env.pop(name, None)
    return env


def trainer_argv(command: str, config: Path, nproc: int | None, *extra: str) -> list[str]:
    """`nproc` None: one plain process (a world of one); else torchrun --standalone."""
    tail = ["-m", "llamajob_trainer.cli", command, "--config", str(config), *extra]
    if nproc is None:
        return [sys.executable, *tail]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc), "--max-restarts", "0", *tail,
    ]


def run_trainer(
    command: str, config: Path, tmp: Path, nproc: int | None = 2, *extra: str,
    timeout: float = 150, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`env`: the whole environment (default `trainer_env(tmp)`)."""
    return subprocess.run(
        trainer_argv(command, config, nproc, *extra),
        env=trainer_env(tmp) if env is None else env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(jsonl: Path) -> list[tuple[int, float]]:
    """(step, loss) of every record, in the order written (a resumed step appears again)."""
    return [
        (rec["step"], rec["loss"])
        for rec in (json.loads(line) for line in jsonl.read_text().splitlines() if line.strip())
    ]


def checkpoint_listing(root: Path) -> dict[str, bool]:
    """Entries of a checkpoint dir -> whether each directory holds the done marker."""
    return {
        p.name: (p / protocol.CHECKPOINT_DONE_MARKER).is_file()
        for p in sorted(root.iterdir())
        if p.is_dir()
    }


def tree_fingerprint(root: Path) -> dict[str, tuple[int, float]]:
    """Every file under root with its size and mtime: equal before and after = untouched."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
