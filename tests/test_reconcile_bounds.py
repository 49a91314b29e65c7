"""reconcile.py with timers far past what a datetime can hold.

An older CRD or a job built in code may carry any integer in hangTimeoutSeconds or
backoffSeconds; the core must decide on it, never raise. The jobs here are built past
the models' validation (``model_copy``) for that reason, so the tests hold whatever maxima the
schema has. Pure: no cluster, no clock.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from llamajob import render
from llamajob.actions import Decision, apply_actions
from llamajob.api import LlamaTrainingJob
from llamajob.jobfile import parse_job
from llamajob.observed import Observed, Progress
from llamajob.reconcile import MAX_BACKOFF_SECONDS, reconcile
from llamajob.status import get_condition, parse_time

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
NODES = 2
DAY = 86400.0


def make_job(**policy: Any) -> LlamaTrainingJob:
    """A tiny CPU job without a compile step; `policy` set on restartPolicy unvalidated."""
    job = parse_job({
        "apiVersion": "llamajob.dev/v1alpha1",
        "kind": "LlamaTrainingJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": {
            "model": {"preset": "tiny"},
            "batch": {"microBatchSize": 1, "globalBatchSize": 2 * NODES},
            "parallelism": {"zero1": False, "sequenceParallel": False},
            "compile": {"enabled": False},
            "cluster": {"nodes": NODES, "instanceType": "cpu", "processesPerNode": 2},
            "restartPolicy": {"maxRestarts": 3, "backoffSeconds": 30},
        },
    })
    policy_model = job.spec.restart_policy.model_copy(update=policy)
    return job.model_copy(update={"spec": job.spec.model_copy(
        update={"restart_policy": policy_model})})


class World:
    """The job and what a shell observes; `step` reconciles and carries out the decision."""

    def __init__(self, job: LlamaTrainingJob) -> None:
        self.job, self.observed, self.now = job, Observed(), T0

    def step(self, dt: float = 0.0) -> Decision:
        self.now += timedelta(seconds=dt)
        d = reconcile(self.job, self.observed, self.now)
        self.observed = apply_actions(self.observed, d)
        self.job = self.job.model_copy(update={"status": d.status})
        return d

    def run_gang(self) -> None:
        self.observed = replace(self.observed, pods=tuple(
            replace(p, phase="Running", node=f"node-{p.rank}") for p in self.observed.pods
        ))

    def progress(self, step: int) -> None:
        self.observed = replace(self.observed, progress=Progress(
            step=step, observed_at=self.now, loss=None, tokens_per_second=None, mfu=None,
            last_checkpoint_step=None, max_steps=None,
        ))


def running(**policy: Any) -> World:
    w = World(make_job(**policy))
    w.step()
    w.run_gang()
    d = w.step(10)
    assert get_condition(d.status, "Running").status == "True"
    return w


@pytest.mark.parametrize(
    "timeout",
    [
        10**15,  # past timedelta's range (about 8.6e13 s)
        300_000_000_000,  # within timedelta's, but T0 + it is past the year 9999
        2**63 - 1,  # the largest integer Kubernetes stores
        10**400,  # past a float's range: only a YAML file or Python code can say this
    ],
)
def test_huge_hang_timeout_keeps_training_and_rechecks_daily(timeout: int) -> None:
    w = running(hang_timeout_seconds=timeout)
    for dt in (0.0, 3600.0, 10 * DAY):
        w.progress(5)
        d = w.step(dt)
        assert d.status.phase == "Training", dt
        assert d.status.faults == [] and d.deleted == []
        assert d.requeue_after == pytest.approx(DAY)
    # No progress for a year is still no hang under such a timeout.
    d = w.step(365 * DAY)
    assert d.status.phase == "Training" and d.requeue_after == pytest.approx(DAY)


def test_a_timeout_beyond_a_day_still_fires_on_time() -> None:
    timeout = 3 * DAY + 5
    w = running(hang_timeout_seconds=int(timeout))
    d = w.step(0)
    assert d.requeue_after == pytest.approx(DAY)  # a daily look, not one three-day timer
    d = w.step(2 * DAY)
    assert d.status.phase == "Training" and d.requeue_after == pytest.approx(DAY)
    d = w.step(DAY)
    assert d.status.phase == "Training" and d.requeue_after == pytest.approx(5)
    d = w.step(5)
    assert d.status.phase == "Restarting"
    fault = d.status.faults[-1]
    assert fault.reason == "Hang" and f"no step progress for {int(timeout)} s" in fault.message


def test_ordinary_timeout_requeues_at_its_deadline_as_before() -> None:
    w = running(hang_timeout_seconds=600)
    d = w.step(100)
    assert d.requeue_after == pytest.approx(500)
    d = w.step(500)
    assert d.status.phase == "Restarting" and d.status.faults[-1].reason == "Hang"


@pytest.mark.parametrize("base", [3600, 10**15, 10**400])
def test_backoff_after_many_restarts_stays_capped(base: int) -> None:
    w = running(backoff_seconds=base, max_restarts=1000)
    w.job = w.job.model_copy(update={"status": w.job.status.model_copy(update={"restarts": 999})})
    pod = render.pod_name("demo", render.ROLE_TRAIN, 1, 0)
    w.observed = replace(w.observed, pods=tuple(
        replace(p, phase="Failed", exit_code=1) if p.name == pod else p for p in w.observed.pods
    ))
    d = w.step(1)
    assert d.status.phase == "Restarting"
    assert parse_time(d.status.restart_after) == w.now + timedelta(seconds=MAX_BACKOFF_SECONDS)
    assert d.requeue_after == pytest.approx(MAX_BACKOFF_SECONDS)
