"""Shared helpers of the XLA tier: a tiny nxd job, a small packed dataset, graph counts."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch_xla
import torch_xla.debug.metrics as met
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.data import prepare_data
from llamajob_trainer.tokenizer import ByteTokenizer

SEQ = 32
# The main suite's tiny model (tests/trainer_helpers.py): two layers, grouped-query attention
# (4 heads over 2 kv heads), small enough that torch-xla compiles a step in seconds.
MODEL = {
    "preset": "tiny",
    "hiddenSize": 64,
    "numLayers": 2,
    "numHeads": 4,
    "numKvHeads": 2,
    "intermediateSize": 192,
}
MICRO_BATCHES = 6


def free_port() -> int:
    """A free localhost port: torch-xla's rendezvous store listens on MASTER_PORT (12355 unless
    set), which another run of this tier at the same time would hold."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return int(probe.getsockname()[1])


def nxd_config(tmp_path: Path, /, **overrides: Any) -> TrainerConfig:
    """A one-rank nxd job at tensor degree 1 with MICRO_BATCHES micro-batches per step and the
    defaults' selective recompute; nested dicts in ``overrides`` are merged one level deep."""
    wire: dict[str, Any] = {
        "model": dict(MODEL),
        "data": {"path": str(tmp_path / "data"), "seqLength": SEQ},
        "batch": {"microBatchSize": 2, "globalBatchSize": 2 * MICRO_BATCHES},
        "optimizer": {"lr": 3e-3, "minLr": 3e-4, "warmupSteps": 3},
        "parallelism": {"tensor": 1},
        "maxSteps": 8,
        "precision": "fp32",
        "seed": 7,
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "metricsPort": 0,
        "jobName": "xla",
        "namespace": "tests",
        "resolvedBackend": "nxd",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(wire.get(key), dict):
            wire[key] = {**wire[key], **value}
        else:
            wire[key] = value
    return TrainerConfig.model_validate(wire)


def packed_dataset(path: Path, seq_length: int = SEQ) -> Path:
    """A small packed dataset of byte tokens (about 700 rows), written by prepare-data."""
    text = path.parent / f"{path.name}.txt"
    text.write_text("\n".join(f"line {i}: the value of {i % 97} is {i * 7 % 101}."
                              for i in range(600)))
    prepare_data([str(text)], path, ByteTokenizer(), seq_length, progress=False)
    return path


@dataclass
class Graphs:
    """Graphs torch-xla compiled and executed while a ``count_graphs`` block ran."""

    compiled: int = 0
    executed: int = 0


def _counters() -> tuple[int, int]:
    # A counter that never fired reads None. UncachedCompile counts graphs compiled (a graph
    # traced again is found in the cache by its hash and counted as CachedCompile instead);
    # ExecuteComputation counts every graph run on the device.
    return (met.counter_value("UncachedCompile") or 0,
            met.counter_value("ExecuteComputation") or 0)


@contextlib.contextmanager
def count_graphs() -> Iterator[Graphs]:
    """``with count_graphs() as graphs: ...``, then ``graphs.compiled`` / ``graphs.executed``."""
    torch_xla.sync()  # whatever was traced before the block runs before it
    graphs = Graphs()
    compiled, executed = _counters()
    yield graphs
    after = _counters()
    graphs.compiled, graphs.executed = after[0] - compiled, after[1] - executed
