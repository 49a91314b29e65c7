"""Damaged checkpoints, one kind per row, under real 2-rank training runs (torchrun + gloo).

Every row starts from the same directory: a run of 12 steps killed right after step 8, so it
holds step_4 and step_8 (both complete and intact). The row damages it, then resumes. Each row
asserts what was loaded, that nothing good was deleted (the damaged checkpoint sits in
quarantine/ with its bytes, the good one was loaded), the message, and for the recoverable kinds
that every loss after the resume equals the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from llamajob_trainer import protocol
from trainer_helpers import (
    checkpoint_listing,
    losses,
    prepare_pydoc,
    run_trainer,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 12


def config(data: Path, ckpt: Path) -> dict[str, object]:
    return tiny_config(data, ckpt, maxSteps=STEPS, checkpoint={"everySteps": 4, "keep": 2})


@dataclass
class Seeded:
    data: Path
    ckpt: Path  # step_4 and step_8, as left by a run killed after step 8
    baseline: dict[int, float]  # the uninterrupted run's loss per step


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    root = tmp_path_factory.mktemp("seeded")
    data = prepare_pydoc(root / "pydoc")
    whole = root / "whole"
    whole.mkdir()
    cfg = write_config(whole / "cfg.yaml", config(data, whole / "ckpt"))
    done = run_trainer("train", cfg, whole, 2, "--log-jsonl", str(whole / "steps.jsonl"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    baseline = dict(losses(whole / "steps.jsonl"))
    assert sorted(baseline) == list(range(1, STEPS + 1))

    killed = root / "killed"
    killed.mkdir()
    cfg = write_config(killed / "cfg.yaml", config(data, killed / "ckpt"))
    run = run_trainer("train", cfg, killed, 2, "--chaos-kill-at-step", "8")
    assert run.returncode != 0
    assert checkpoint_listing(killed / "ckpt") == {"step_4": True, "step_8": True}
    return Seeded(data, killed / "ckpt", baseline)


def shard(step: Path) -> Path:
    return sorted((step / "state").glob("*.distcp"))[0]


def flip_bytes(ckpt: Path) -> str:
    target = shard(ckpt / "step_8")
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    target.write_bytes(bytes(raw))  # same size: only the digest can tell
    return rf"state/{target.name} has changed"


def truncate(ckpt: Path) -> str:
    target = shard(ckpt / "step_8")
    target.write_bytes(target.read_bytes()[:-64])
    return rf"state/{target.name} has \d+ bytes, expected \d+"


def delete_shard(ckpt: Path) -> str:
    target = shard(ckpt / "step_8")
    target.unlink()
    return rf"state/{target.name} is missing"


def garbage_manifest(ckpt: Path) -> str:
    (ckpt / "step_8" / "manifest.json").write_text("{not json")
    return r"manifest.json cannot be read"


def garbage_shard_metadata(ckpt: Path) -> str:
    meta = ckpt / "step_8" / "state" / ".metadata"
    meta.write_bytes(b"\x80\x04garbage" + b"\0" * (meta.stat().st_size - 9))
    return r"state/.metadata has changed"


def garbage_trainer_state(ckpt: Path) -> str:
    (ckpt / "step_8" / "trainer_state.json").write_text('{"step": 8, "data": [')
    return r"trainer_state.json cannot be read"


def garbage_rng(ckpt: Path) -> str:
    rng = ckpt / "step_8" / "rng" / "rank_1.pt"
    rng.write_bytes(b"\x80\x02}q\x00garbage" * 8)
    return r"rng/rank_1.pt has \d+ bytes|rng/rank_1.pt has changed"


def fake_newest(ckpt: Path) -> str:
    # A plausible copy (e.g. a restore that renamed a directory): complete, every file intact,
    # but its trainer state says step 8 under the name step_12.
    shutil.copytree(ckpt / "step_8", ckpt / "step_12")
    return r"trainer_state.json is for step 8, not 12"


@dataclass(frozen=True)
class Recoverable:
    damage: Callable[[Path], str]
    loaded: str  # the checkpoint the resume must start from
    quarantined: str  # the one moved aside


RECOVERABLE = {
    "bytes-changed-in-place": Recoverable(flip_bytes, "step_4", "step_8"),
    "truncated": Recoverable(truncate, "step_4", "step_8"),
    "deleted-shard": Recoverable(delete_shard, "step_4", "step_8"),
    "garbage-manifest": Recoverable(garbage_manifest, "step_4", "step_8"),
    "garbage-shard-metadata": Recoverable(garbage_shard_metadata, "step_4", "step_8"),
    "garbage-trainer-state": Recoverable(garbage_trainer_state, "step_4", "step_8"),
    "garbage-rng": Recoverable(garbage_rng, "step_4", "step_8"),
    "plausible-fake-newest": Recoverable(fake_newest, "step_8", "step_12"),
}


def copy_seeded(seeded: Seeded, tmp: Path) -> tuple[Path, Path]:
    ckpt = tmp / "ckpt"
    shutil.copytree(seeded.ckpt, ckpt)
    cfg = write_config(tmp / "cfg.yaml", config(seeded.data, ckpt))
    return ckpt, cfg


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def refused(run: subprocess.CompletedProcess[str], tmp: Path) -> bool:
    """A permanent data error (torchrun itself exits 1; the cause travels in the termination
    message), reported as a line, not a traceback."""
    assert run.returncode != 0, run.stdout[-2000:]
    term = json.loads((tmp / "termination.json").read_text())
    assert term["permanent"] is True and term["reason"] == "CheckpointCorrupt", term
    assert term["exitCode"] == protocol.EXIT_DATA
    assert "llamajob train: error: " in run.stderr
    # torchrun prints its own traceback for a failed worker; none may come from the trainer.
    assert "llamajob_trainer/" not in run.stderr, run.stderr[-3000:]
    return True


@pytest.mark.parametrize("kind", sorted(RECOVERABLE))
def test_damaged_checkpoint_is_quarantined_and_the_next_one_resumes_bit_identically(
    kind: str, seeded: Seeded, tmp_path: Path
) -> None:
    row = RECOVERABLE[kind]
    ckpt, cfg = copy_seeded(seeded, tmp_path)
    message = row.damage(ckpt)
    damaged = files_under(ckpt / row.quarantined)
    jsonl = tmp_path / "steps.jsonl"

    run = run_trainer("train", cfg, tmp_path, 2, "--log-jsonl", str(jsonl))

    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert re.search(rf"checkpoint: {row.quarantined} is damaged: .*({message})", out), out[-3000:]
    assert f"resumed from {row.loaded}" in out
    # The damaged one is kept, byte for byte, with a note naming what failed.
    (moved,) = (ckpt / "quarantine").iterdir()
    assert moved.name.startswith(f"{row.quarantined}.")
    note = (moved / "QUARANTINED.txt").read_text()
    assert re.search(message, note), note
    kept = files_under(moved)
    kept.pop("QUARANTINED.txt")
    assert kept == damaged
    # The good one was loaded before anything was pruned: any pruning comes after the load,
    # once the run saved its own checkpoints, and only by `keep`.
    pruned = out.find("checkpoint: removing old checkpoint")
    assert pruned == -1 or pruned > out.index(f"resumed from {row.loaded}"), out[-3000:]
    assert checkpoint_listing(ckpt) == {"quarantine": False, "step_12": True, "step_8": True}
    start = int(row.loaded.split("_")[1])
    records = losses(jsonl)
    assert [s for s, _ in records] == list(range(start + 1, STEPS + 1))
    assert records == [(s, seeded.baseline[s]) for s, _ in records]


def test_every_step_without_done_is_refused_and_nothing_is_deleted(
    seeded: Seeded, tmp_path: Path
) -> None:
    ckpt, cfg = copy_seeded(seeded, tmp_path)
    for step in ("step_4", "step_8"):
        (ckpt / step / protocol.CHECKPOINT_DONE_MARKER).unlink()
    before = {step: files_under(ckpt / step) for step in ("step_4", "step_8")}

    run = run_trainer("train", cfg, tmp_path, 2)

    assert refused(run, tmp_path)
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("llamajob train: error:")]
    assert lines, run.stderr[-2000:]
    assert re.search(r"holds no intact checkpoint to resume from: step_4 \(no 'done' marker\); "
                     r"step_8 \(no 'done' marker\)\. Nothing was deleted", lines[0]), lines[0]
    assert "checkpoint.resume: none" in lines[0]
    # Both are kept whole, out of the way; no step directory was made or deleted.
    moved = {p.name.split(".")[0]: p for p in (ckpt / "quarantine").iterdir()}
    assert sorted(moved) == ["step_4", "step_8"]
    for step, files in before.items():
        kept = files_under(moved[step])
        kept.pop("QUARANTINED.txt")
        assert kept == files
    assert not [p for p in ckpt.iterdir() if p.name.startswith("step_")]

    # A second try does not start over either: the quarantined steps still speak for the run.
    again = run_trainer("train", cfg, tmp_path, 2)
    assert refused(again, tmp_path)
    assert "earlier quarantined: step_4." in again.stderr

    # Asked to start over, it does, and leaves the quarantine alone.
    fresh = tiny_config(seeded.data, ckpt, maxSteps=4, checkpoint={"resume": "none",
                                                                   "everySteps": 4})
    over = run_trainer("train", write_config(tmp_path / "fresh.yaml", fresh), tmp_path, 2)
    assert over.returncode == 0, over.stdout[-2000:] + over.stderr[-2000:]
    assert "fresh start" in over.stdout
    assert sorted(p.name.split(".")[0] for p in (ckpt / "quarantine").iterdir()) == [
        "step_4", "step_8"]


def test_every_checkpoint_damaged_is_a_permanent_error_naming_each(
    seeded: Seeded, tmp_path: Path
) -> None:
    ckpt, cfg = copy_seeded(seeded, tmp_path)
    for step in ("step_4", "step_8"):
        (ckpt / step / "trainer_state.json").write_text("[]")

    run = run_trainer("train", cfg, tmp_path, 2)

    assert refused(run, tmp_path)
    assert re.search(r"step_8 \(trainer_state.json is not a JSON object\); step_4 \(trainer_state"
                     r".json is not a JSON object\)", run.stderr), run.stderr[-2000:]
    assert sorted(p.name.split(".")[0] for p in (ckpt / "quarantine").iterdir()) == [
        "step_4", "step_8"]


def test_explicit_resume_of_a_damaged_step_is_refused_not_replaced(
    seeded: Seeded, tmp_path: Path
) -> None:
    ckpt, _ = copy_seeded(seeded, tmp_path)
    flip_bytes(ckpt)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        seeded.data, ckpt, maxSteps=STEPS, checkpoint={"everySteps": 4, "keep": 2, "resume": 8}))

    run = run_trainer("train", cfg, tmp_path, 2)

    assert refused(run, tmp_path)
    assert re.search(r"checkpoint.resume asks for step 8, but .*step_8 is damaged \(state/.*has "
                     r"changed", run.stderr), run.stderr[-2000:]
    assert checkpoint_listing(ckpt) == {"quarantine": False, "step_4": True}
