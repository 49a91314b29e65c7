"""Divergence is a fault class: a non-finite loss or gradient norm stops training before anything
is saved, and the job fails as TrainingDiverged (or rolls back, as restartPolicy.onDivergence
says), with the value carried honestly (null plus a word in JSON).

Three levels: the trainer under torchrun (2 ranks), the operator's pure decisions, and
`llamajob run` end to end. The NaN comes from the `nanAtStep` fault injection, which overwrites
rank 0's parameters just before a step, as a faulty device would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from llamajob_trainer import protocol
from test_reconcile import cond, events, running_world
from trainer_helpers import (
    checkpoint_listing,
    prepare_pydoc,
    run_trainer,
    tiny_config,
    write_config,
)


def _strict(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as strict parsers do."""

    def refuse(word: str) -> None:
        raise ValueError(f"non-standard JSON constant {word}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_pydoc(tmp_path_factory.mktemp("data") / "pydoc")


@pytest.mark.slow
def test_nan_loss_stops_before_any_checkpoint_after_it(data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    # A checkpoint every step: the one that would follow the NaN step must never appear.
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(
        data, ckpt, maxSteps=10, checkpoint={"everySteps": 1, "keep": 2}))
    jsonl = tmp_path / "steps.jsonl"

    run = run_trainer("train", cfg, tmp_path, 2, "--log-jsonl", str(jsonl),
                      "--chaos-nan-at-step", "6")

    assert run.returncode != 0
    assert checkpoint_listing(ckpt) == {"step_4": True, "step_5": True}
    term = json.loads((tmp_path / "termination.json").read_text())
    assert term["reason"] == "TrainingDiverged" and term["permanent"] is False
    assert (term["exitCode"], term["step"], term["loss"]) == (protocol.EXIT_DIVERGED, 6, "nan")
    assert "newest checkpoint: step_5" in term["message"]
    assert "llamajob train: error: training diverged at step 6: loss nan" in run.stderr
    assert "llamajob_trainer/" not in run.stderr  # a line, not a traceback
    records = [_strict(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    last = records[-1]
    assert (last["loss"], last["loss_non_finite"]) == (None, "nan")
    assert (last["grad_norm"], last["grad_norm_non_finite"]) == (None, "nan")
    assert all("loss_non_finite" not in r for r in records[:-1])


# --- the operator's decisions ---------------------------------------------------------------

DIVERGED = {
    "reason": "TrainingDiverged", "permanent": False, "exitCode": protocol.EXIT_DIVERGED,
    "step": 37, "loss": "nan", "message": "training diverged at step 37: loss nan",
}


def test_divergence_fails_the_job_by_default_with_the_value_in_the_status() -> None:
    w = running_world()
    # torchrun reports any failed worker as exit code 1; the cause is the termination message.
    w.set_rank("train", 1, 0, phase="Failed", exit_code=1, termination_message=DIVERGED)
    d = w.step(5)
    st = d.status
    assert st.phase == "Failed" and st.restarts == 0
    assert cond(d, "Failed").reason == "TrainingDiverged"
    assert "training diverged at step 37" in st.message
    assert (st.step, st.loss, st.loss_non_finite) == (37, None, "nan")
    assert st.faults[-1].reason == "TrainingDiverged"
    assert events(d) == [("Warning", "Failed")]
    wire = st.model_dump(by_alias=True, mode="json")
    assert wire["loss"] is None and wire["lossNonFinite"] == "nan"
    _strict(json.dumps(wire))


def test_rollback_restarts_from_the_newest_checkpoint_within_max_restarts() -> None:
    w = running_world(onDivergence="Rollback", maxRestarts=1)
    w.set_rank("train", 1, 2, phase="Failed", exit_code=1, termination_message=DIVERGED)
    d = w.step(5)
    assert d.status.phase == "Restarting"
    assert d.status.loss_non_finite == "nan"
    assert ("Warning", "TrainingDiverged") in events(d)
    w.gc()
    d = w.step(60)
    assert d.status.phase == "Training" and d.status.attempt == 2 and d.status.restarts == 1
    w.schedule("train", 2)
    w.step(10)
    # Diverging again with no restarts left ends as TrainingDiverged, not a generic backoff.
    w.set_rank("train", 2, 0, phase="Failed", exit_code=1, termination_message=DIVERGED)
    d = w.step(5)
    assert d.status.phase == "Failed"
    assert cond(d, "Failed").reason == "TrainingDiverged"
    assert "no restarts left" in d.status.message


def test_a_finite_loss_after_rollback_clears_the_flag() -> None:
    from dataclasses import replace

    from llamajob.observed import Progress

    w = running_world(onDivergence="Rollback")
    w.set_rank("train", 1, 0, phase="Failed", exit_code=1, termination_message=DIVERGED)
    w.step(5)
    w.gc()
    w.step(60)
    w.schedule("train", 2)
    w.observed = replace(w.observed, progress=Progress(
        step=38, loss=2.5, tokens_per_second=1.0, mfu=0.1, last_checkpoint_step=30,
        max_steps=1000, observed_at=w.now))
    d = w.step(1)
    assert (d.status.loss, d.status.loss_non_finite) == (2.5, None)


# --- llamajob run, end to end ---------------------------------------------------------------


def _job(tmp: Path, data: Path, policy: str) -> Path:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["metadata"]["name"] = f"diverge-{policy.lower()}"
    spec = obj["spec"]
    spec["maxSteps"] = 12
    spec["data"]["path"] = str(data)
    spec["data"]["seqLength"] = 64
    spec["model"].update(hiddenSize=64, numLayers=2, numHeads=4, numKvHeads=2,
                         intermediateSize=192)
    spec.pop("validation", None)
    spec["checkpoint"].update(dir=str(tmp / "ckpt"), everySteps=4, keep=2)
    spec["compile"]["enabled"] = False
    spec["restartPolicy"].update(backoffSeconds=0, hangTimeoutSeconds=300, onDivergence=policy)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


def _run(tmp: Path, job: Path) -> tuple[dict[str, Any], str, int]:
    summary = tmp / "summary.json"
    env = {**os.environ, protocol.CHAOS_NAN_AT_STEP_ENV: "6", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "llamajob.cli", "run", str(job), "--no-progress",
         "--summary-json", str(summary), "--run-dir", str(tmp / "run")],
        capture_output=True, text=True, timeout=600, cwd=tmp, env=env, check=False,
    )
    assert summary.exists(), res.stdout + res.stderr
    return _strict(summary.read_text()), res.stdout + res.stderr, res.returncode


@pytest.mark.slow
def test_local_run_fails_as_training_diverged(data: Path, tmp_path: Path) -> None:
    summary, out, code = _run(tmp_path, _job(tmp_path, data, "Fail"))
    assert code == 1, out
    assert summary["phase"] == "Failed", out
    assert "training diverged at step 6" in summary["message"]
    assert (summary["final_step"], summary["final_loss"]) == (6, None)
    assert summary["final_loss_non_finite"] == "nan"
    assert summary["restarts"] == 0
    assert summary["checkpoints"] == ["step_4"]  # nothing saved after the NaN
    assert "final loss  nan (diverged)" in out


@pytest.mark.slow
def test_local_run_rolls_back_and_finishes(data: Path, tmp_path: Path) -> None:
    # The injected NaN fires once per job, so the rollback's replay of steps 5 and 6 is clean:
    # the case of a transient device fault, which is what Rollback is for.
    summary, out, code = _run(tmp_path, _job(tmp_path, data, "Rollback"))
    assert code == 0, out
    assert summary["phase"] == "Succeeded"
    assert summary["restarts"] == 1
    assert summary["faults"][0]["reason"] == "TrainingDiverged"
    assert summary["final_step"] == 12 and summary["final_loss_non_finite"] is None
    second = (tmp_path / "run" / "attempt-2" / "train.log").read_text()
    assert "resumed from step_4 " in second, second[-2000:]
