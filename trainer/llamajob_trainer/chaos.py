"""Fault injection for resilience tests and demos: kill the trainer at chosen points, once per job.

- kill at step N: right after step N has fully completed (logged, metrics set and, when N is a
  checkpoint step, its checkpoint saved), rank 0 kills itself with SIGKILL: no cleanup, no
  flush, as a node loss would. torchrun then tears down the other ranks.
- kill during checkpoint: rank 0 kills itself in the middle of its next checkpoint write, after
  every rank's shards are on disk and before the `done` marker.

Each fault fires once per job: before dying, rank 0 records it in the CHAOS_MARKER file in the
checkpoint directory, which survives restarts, so the resumed run does not die again.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import protocol

KILL_AT_STEP = "killAtStep"
KILL_DURING_CHECKPOINT = "killDuringCheckpoint"


@dataclass(frozen=True)
class ChaosConfig:
    kill_at_step: int | None = None
    kill_during_checkpoint: bool = False

    @property
    def enabled(self) -> bool:
        return self.kill_at_step is not None or self.kill_during_checkpoint


def chaos_from(
    kill_at_step: int | None, kill_during_checkpoint: bool, environ: Mapping[str, str]
) -> ChaosConfig:
    """Command-line flags win; otherwise the environment (set by the operator or local runner)."""
    if kill_at_step is None:
        raw = environ.get(protocol.CHAOS_KILL_AT_STEP_ENV, "").strip()
        kill_at_step = int(raw) if raw.isdigit() and int(raw) > 0 else None
    if not kill_during_checkpoint:
        raw = environ.get(protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV, "").strip().lower()
        kill_during_checkpoint = raw in {"1", "true", "yes"}
    return ChaosConfig(kill_at_step, kill_during_checkpoint)


def read_fired(marker: Path) -> dict[str, object]:
    try:
        value = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class Chaos:
    """The rank-0 side of fault injection; on other ranks every hook does nothing."""

    def __init__(self, config: ChaosConfig, checkpoint_dir: str | Path, rank: int) -> None:
        self.config = config
        self.marker = Path(checkpoint_dir) / protocol.CHAOS_MARKER
        self.active = rank == 0 and config.enabled

    def _fire(self, fault: str, detail: object) -> None:
        fired = read_fired(self.marker)
        fired[fault] = detail
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        with tmp.open("w") as handle:
            handle.write(json.dumps(fired, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.marker)
        print(f"chaos: injecting {fault} ({detail}): SIGKILL to rank 0 (pid {os.getpid()})",
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int) -> None:
        if not self.active or self.config.kill_at_step != step:
            return
        if KILL_AT_STEP in read_fired(self.marker):
            return
        self._fire(KILL_AT_STEP, step)

    def before_checkpoint_done(self, step: int) -> None:
        if not self.active or not self.config.kill_during_checkpoint:
            return
        if KILL_DURING_CHECKPOINT in read_fired(self.marker):
            return
        self._fire(KILL_DURING_CHECKPOINT, step)
