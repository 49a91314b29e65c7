"""reconcile.py: from (job, last status, observed children, now) to actions and the new status.

Table-driven over every phase transition and fault class, plus the properties the shells rely
on: a fixed point once actions are applied, events only on transitions, never a create for a pod
already observed. Pure: no cluster, no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from conftest import ROOT, avoided_nodes
from llamajob import reconcile as rc
from llamajob import render
from llamajob.actions import (
    CreateObject,
    Decision,
    DeletePods,
    EmitEvent,
    RequeueAfter,
    apply_actions,
)
from llamajob.api import LlamaTrainingJob, LlamaTrainingJobStatus
from llamajob.jobfile import SpecError, parse_job
from llamajob.observed import NodeHealth, Observed, ObservedPod, Progress
from llamajob.reconcile import reconcile
from llamajob.status import get_condition, parse_time
from llamajob_trainer import protocol

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
NODES = 4
SECRET_VALUE = "hf_s3cr3t_value_never_seen"


def make_job(
    *,
    compile_: bool = True,
    nodes: int = NODES,
    status: LlamaTrainingJobStatus | None = None,
    generation: int = 1,
    **policy: Any,
) -> LlamaTrainingJob:
    """A small CPU job: `nodes` pods of 2 ranks, tiny model."""
    obj: dict[str, Any] = {
        "apiVersion": "llamajob.dev/v1alpha1",
        "kind": "LlamaTrainingJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": generation},
        "spec": {
            "model": {"preset": "tiny"},
            "batch": {"microBatchSize": 1, "globalBatchSize": 2 * nodes},
            "parallelism": {"zero1": False, "sequenceParallel": False},
            "maxSteps": 1000,
            "compile": {"enabled": compile_},
            "cluster": {
                "nodes": nodes,
                "instanceType": "cpu",
                "processesPerNode": 2,
                "secrets": [{"name": "HF_TOKEN", "secretName": "hf", "key": "token"}],
            },
            "restartPolicy": {
                "maxRestarts": 3,
                "backoffSeconds": 30,
                "hangTimeoutSeconds": 600,
                **policy,
            },
        },
    }
    job = parse_job(obj)
    return job.model_copy(update={"status": status})


def with_status(job: LlamaTrainingJob, status: LlamaTrainingJobStatus) -> LlamaTrainingJob:
    return job.model_copy(update={"status": status})


def name(role: str, attempt: int, rank: int) -> str:
    return render.pod_name("demo", role, attempt, rank)


def gang(
    role: str, attempt: int, phase: str = "Running", n: int = NODES, **kw: Any
) -> list[ObservedPod]:
    return [
        ObservedPod(name(role, attempt, r), role, attempt, r, phase, node=f"node-{r}", **kw)
        for r in range(n)
    ]


class AnyName(frozenset[str]):
    """Observed ConfigMaps when a test is not about them: whatever revision the job is at."""

    def __contains__(self, name: object) -> bool:
        return True


def obs(pods: list[ObservedPod] = (), **kw: Any) -> Observed:  # type: ignore[assignment]
    kw.setdefault("service", True)
    kw.setdefault("configmaps", AnyName())
    return Observed(pods=tuple(pods), **kw)


def set_pod(pods: list[ObservedPod], rank: int, **changes: Any) -> list[ObservedPod]:
    return [replace(p, **changes) if p.rank == rank else p for p in pods]


def events(d: Decision) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in d.events]


def cond(d: Decision, type_: str) -> Any:
    return get_condition(d.status, type_)


def assert_fixed_point(job: LlamaTrainingJob, observed: Observed, d: Decision, now: datetime):
    """Carry out `d`, reconcile again: no create, no delete, no event, same status."""
    after = apply_actions(observed, d)
    again = reconcile(with_status(job, d.status), after, now)
    assert again.creates == [], [c.name for c in again.creates]
    assert again.deleted == []
    assert again.events == []
    assert again.status == d.status
    return after


# --- driving a job through its life -------------------------------------------------------------
class World:
    """The job plus what a shell would observe; `step` reconciles and carries out the actions."""

    def __init__(self, job: LlamaTrainingJob) -> None:
        self.job = job
        self.observed = Observed()
        self.now = T0
        self.history: list[Decision] = []

    def step(self, dt: float = 0.0) -> Decision:
        self.now += timedelta(seconds=dt)
        d = reconcile(self.job, self.observed, self.now)
        present = {p.name for p in self.observed.pods}
        assert not {c.name for c in d.created_pods} & present, "created a pod already observed"
        self.observed = apply_actions(self.observed, d)
        self.job = with_status(self.job, d.status)
        self.history.append(d)
        return d

    def pods(self, role: str | None = None, attempt: int | None = None) -> list[ObservedPod]:
        return [
            p
            for p in self.observed.pods
            if (role is None or p.role == role) and (attempt is None or p.attempt == attempt)
        ]

    def set(self, role: str, attempt: int, **changes: Any) -> None:
        self.observed = replace(
            self.observed,
            pods=tuple(
                replace(p, **changes) if p.role == role and p.attempt == attempt else p
                for p in self.observed.pods
            ),
        )

    def set_rank(self, role: str, attempt: int, rank: int, **changes: Any) -> None:
        self.observed = replace(
            self.observed,
            pods=tuple(
                replace(p, **changes) if (p.role, p.attempt, p.rank) == (role, attempt, rank) else p
                for p in self.observed.pods
            ),
        )

    def schedule(self, role: str, attempt: int) -> None:
        """Play scheduler and kubelet: every pod of the gang on node-{rank}, running."""
        self.observed = replace(
            self.observed,
            pods=tuple(
                replace(p, phase="Running", node=f"node-{p.rank}")
                if p.role == role and p.attempt == attempt
                else p
                for p in self.observed.pods
            ),
        )

    def gc(self) -> None:
        """Deleted pods finish terminating and disappear."""
        self.observed = replace(
            self.observed, pods=tuple(p for p in self.observed.pods if not p.deleting)
        )


# --- validation -----------------------------------------------------------------------------------
def test_invalid_spec_fails_with_field_and_fix_and_creates_nothing() -> None:
    obj = make_job().model_dump(by_alias=True, exclude_none=True)
    obj["spec"]["parallelism"]["tensor"] = 3
    job = parse_job(obj)
    d = reconcile(job, Observed(), T0)
    assert d.status.phase == "Failed"
    assert d.creates == [] and d.deleted == []
    failed = cond(d, "Failed")
    assert (failed.status, failed.reason) == ("True", "InvalidSpec")
    assert "spec.parallelism.tensor" in failed.message and "nearest valid: " in failed.message
    assert cond(d, "Validated").status == "False"
    assert events(d) == [("Warning", "Failed")]
    assert d.events[0].message.startswith("InvalidSpec: spec.parallelism.tensor")
    assert d.status.observed_generation == 1
    assert_fixed_point(job, Observed(), d, T0 + timedelta(minutes=5))


def test_spec_that_does_not_fit_memory_is_invalid() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "llama3-8b.yaml").read_text())
    obj["spec"]["parallelism"]["tensor"] = 8
    d = reconcile(parse_job(obj), Observed(), T0)
    assert d.status.phase == "Failed" and d.creates == []
    assert "GiB" in d.status.message and "spec.parallelism" in d.status.message


def test_unparseable_spec_from_the_shell() -> None:
    running = gang("train", 1)
    d = rc.reconcile_invalid(
        "demo",
        [SpecError("spec.cluster.nodes", "Input should be greater than or equal to 1 (got 0)")],
        LlamaTrainingJobStatus(phase="Training", attempt=1),
        observed=obs(running),
        now=T0,
        generation=4,
    )
    assert d.status.phase == "Failed"
    assert cond(d, "Failed").reason == "InvalidSpec"
    assert "spec.cluster.nodes" in d.status.message
    assert sorted(d.deleted) == sorted(p.name for p in running)
    assert d.creates == [] and d.status.observed_generation == 4
    assert events(d) == [("Warning", "Failed")]


def test_invalid_job_starts_once_its_spec_is_fixed() -> None:
    obj = make_job().model_dump(by_alias=True, exclude_none=True)
    obj["spec"]["parallelism"]["tensor"] = 3
    bad = reconcile(parse_job(obj), Observed(), T0)
    fixed = with_status(make_job(generation=2), bad.status)
    d = reconcile(fixed, obs(), T0 + timedelta(minutes=1))
    assert d.status.phase == "Compiling"
    assert cond(d, "Validated").status == "True" and cond(d, "Failed") is None
    assert events(d) == [("Normal", "Validated"), ("Normal", "CompileStarted")]
    # The same generation again: still terminal, nothing happens.
    same = reconcile(with_status(make_job(generation=1), bad.status), obs(), T0)
    assert same.status.phase == "Failed" and same.actions == ()


# --- the happy path -------------------------------------------------------------------------------
def test_first_reconcile_validates_and_starts_the_compile_gang() -> None:
    job = make_job()
    d = reconcile(job, Observed(), T0)
    st = d.status
    assert (st.phase, st.attempt, st.restarts) == ("Compiling", 1, 0)
    assert (st.world_size, st.pods, st.max_steps) == (8, 4, 1000)
    assert st.start_time == "2025-03-01T12:00:00Z" and st.observed_generation == 1
    assert st.compile_key
    kinds = [c.kind for c in d.creates]
    assert kinds == ["Service", "ConfigMap", "Pod", "Pod", "Pod", "Pod"]
    assert [c.name for c in d.created_pods] == [name("compile", 1, r) for r in range(NODES)]
    assert [(c.role, c.attempt, c.rank) for c in d.created_pods] == [
        ("compile", 1, r) for r in range(NODES)
    ]
    assert events(d) == [("Normal", "Validated"), ("Normal", "CompileStarted")]
    assert cond(d, "Validated").status == "True"
    assert cond(d, "Compiled").status == "False"
    assert cond(d, "Running").status == "False"
    assert all(c.observed_generation == 1 for c in st.conditions)
    assert_fixed_point(job, Observed(), d, T0)


def test_existing_children_are_not_created_again() -> None:
    job = make_job()
    already = gang("compile", 1, "Pending")[:2]
    d = reconcile(job, obs(already), T0)
    assert [c.kind for c in d.creates] == ["Pod", "Pod"]
    assert [c.rank for c in d.created_pods] == [2, 3]


def test_compile_disabled_goes_straight_to_training() -> None:
    job = make_job(compile_=False)
    d = reconcile(job, obs(), T0)
    assert d.status.phase == "Training"
    assert [c.name for c in d.created_pods] == [name("train", 1, r) for r in range(NODES)]
    assert (cond(d, "Compiled").status, cond(d, "Compiled").reason) == ("True", "CompileDisabled")
    assert events(d) == [("Normal", "Validated"), ("Normal", "TrainingStarted")]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({}, "CompileFinished"),
        ({"compileCached": False, "compileKey": "k1"}, "CompileFinished"),
        ({"compileCached": True, "compileKey": "k1"}, "CompileSkipped"),
    ],
)
def test_compile_success_moves_to_training(message: dict[str, Any], reason: str) -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.step()
    w.set("compile", 1, phase="Succeeded", exit_code=0, termination_message=message)
    d = w.step(30)
    assert d.status.phase == "Training" and d.status.attempt == 1
    assert (cond(d, "Compiled").status, cond(d, "Compiled").reason) == ("True", reason)
    assert events(d) == [("Normal", reason), ("Normal", "TrainingStarted")]
    assert sorted(d.deleted) == [name("compile", 1, r) for r in range(NODES)]
    assert [c.name for c in d.created_pods] == [name("train", 1, r) for r in range(NODES)]
    if message.get("compileKey"):
        assert d.status.compile_key == "k1"
    assert_fixed_point(w.job, w.observed, w.step(), w.now)


def test_training_runs_then_succeeds() -> None:
    w = World(make_job(compile_=False))
    w.step()
    w.schedule("train", 1)
    d = w.step(10)
    running = cond(d, "Running")
    assert (running.status, running.reason) == ("True", "AllPodsRunning")
    assert running.last_transition_time == "2025-03-01T12:00:10Z"
    assert d.status.phase == "Training" and d.creates == []
    w.set("train", 1, phase="Succeeded", exit_code=0)
    d = w.step(100)
    assert d.status.phase == "Succeeded"
    assert d.status.completion_time == "2025-03-01T12:01:50Z"
    assert cond(d, "Succeeded").status == "True"
    assert cond(d, "Running").status == "False"
    assert events(d) == [("Normal", "Succeeded")]
    assert d.deleted == []  # finished pods stay for their logs
    assert_fixed_point(w.job, w.observed, d, w.now + timedelta(hours=1))


def test_some_ranks_done_is_not_success() -> None:
    w = World(make_job(compile_=False))
    w.step()
    w.schedule("train", 1)
    w.step()
    w.set_rank("train", 1, 0, phase="Succeeded", exit_code=0)
    d = w.step(1)
    assert d.status.phase == "Training" and d.events == []


def test_ranks_that_finished_early_count_as_started() -> None:
    """A short run can have rank 0 done before the watch ever showed all ranks Running; the
    gang still formed, so a rank vanishing now is a fault rather than a pod to recreate."""
    w = World(make_job(compile_=False))
    w.step()
    w.schedule("train", 1)
    w.set_rank("train", 1, 0, phase="Succeeded", exit_code=0)
    d = w.step(5)
    assert (cond(d, "Running").status, cond(d, "Running").reason) == ("True", "AllPodsRunning")
    w.observed = replace(w.observed, pods=tuple(p for p in w.observed.pods if p.rank != 3))
    d = w.step(5)
    assert d.created_pods == [] and d.status.phase == "Restarting"


def test_lost_pod_before_the_gang_formed_is_recreated() -> None:
    w = World(make_job(compile_=False))
    w.step()
    w.set_rank("train", 1, 0, phase="Running", node="node-0")  # the others still Pending
    w.observed = replace(
        w.observed, pods=tuple(p for p in w.observed.pods if p.rank != 2)
    )  # vanished before anyone ran
    d = w.step(5)
    assert [c.name for c in d.created_pods] == [name("train", 1, 2)]
    assert d.status.phase == "Training" and d.status.faults == []


# --- faults -----------------------------------------------------------------------------------
def running_world(**policy: Any) -> World:
    """Training attempt 1 with the gang formed on node-0..3."""
    w = World(make_job(compile_=False, **policy))
    w.step()
    w.schedule("train", 1)
    w.step(10)
    assert get_condition(w.job.status, "Running").status == "True"
    return w


FAULTS = [
    # id, pod changes on rank 2, node health, fault reason, event reason, node avoided
    ("failed-exit-1", {"phase": "Failed", "exit_code": 1, "reason": "Error"}, None,
     "PodFailed", "PodFailed", False),
    ("oom-killed", {"phase": "Failed", "exit_code": 137, "reason": "OOMKilled"}, None,
     "OOMKilled", "OOMKilled", False),
    ("evicted", {"phase": "Failed", "reason": "Evicted"}, None, "Evicted", "NodeFault", True),
    ("node-unhealthy-label", {}, NodeHealth("node-2", False, "UnschedulablePendingReplacement"),
     "NodeUnhealthy", "NodeFault", True),
    ("node-not-ready", {}, NodeHealth("node-2", False, "NotReady (NodeStatusUnknown)"),
     "NodeUnhealthy", "NodeFault", True),
    ("node-gone", {}, NodeHealth("node-2", False, "NodeGone"), "NodeGone", "NodeFault", True),
    ("pod-unknown", {"phase": "Unknown"}, None, "NodeLost", "NodeFault", True),
    ("pod-gc-node-gone", {"reason": "NodeGone", "deleting": True}, None,
     "NodeGone", "NodeFault", True),
    ("deleted-by-someone", {"deleting": True}, None, "PodDeleted", "PodDeleted", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "health", "reason", "event", "avoided"),
    [pytest.param(*f[1:], id=f[0]) for f in FAULTS],
)
def test_fault_tears_down_the_gang_and_schedules_a_restart(
    changes: dict[str, Any], health: NodeHealth | None, reason: str, event: str, avoided: bool
) -> None:
    w = running_world()
    w.set_rank("train", 1, 2, **changes)
    if health is not None:
        nodes = {"node-2": health, "node-1": NodeHealth("node-1", True)}
        w.observed = replace(w.observed, nodes=nodes)
    d = w.step(60)
    st = d.status
    assert st.phase == "Restarting" and st.attempt == 1 and st.restarts == 0
    assert st.restart_after == "2025-03-01T12:01:40Z"  # now + backoffSeconds (first restart)
    assert d.requeue_after == 30
    expected_deletes = sorted(
        p.name for p in gang("train", 1) if not changes.get("deleting") or p.rank != 2
    )
    assert sorted(d.deleted) == expected_deletes
    # Short grace: survivors cannot save without their peer, and the new gang waits for them.
    assert {a.grace_seconds for a in d.actions if isinstance(a, DeletePods)} == {30}
    [fault] = st.faults
    assert (fault.attempt, fault.pod, fault.node, fault.reason) == (
        1,
        name("train", 1, 2),
        "node-2",
        reason,
    )
    assert fault.time == "2025-03-01T12:01:10Z"
    assert st.faulty_nodes == (["node-2"] if avoided else [])
    assert events(d) == [("Warning", event)]
    assert name("train", 1, 2) in d.events[0].message and reason in d.events[0].message
    assert cond(d, "Running").reason == "Restarting"
    assert d.creates == []
    assert_fixed_point(w.job, w.observed, d, w.now)


def test_missing_pod_after_the_gang_formed_is_a_fault() -> None:
    w = running_world()
    w.observed = replace(w.observed, pods=tuple(p for p in w.observed.pods if p.rank != 1))
    d = w.step(5)
    assert d.status.phase == "Restarting"
    assert d.created_pods == []  # never recreate one rank of a running gang
    assert d.status.faults[-1].reason == "PodDeleted"
    assert d.status.faults[-1].pod == name("train", 1, 1)


def test_node_fault_is_recorded_ahead_of_the_crashes_it_caused() -> None:
    """Rank 1's node dies; rank 3 fails in the collective shortly after. The node is the cause."""
    w = running_world()
    w.set_rank("train", 1, 3, phase="Failed", exit_code=1, reason="Error")
    w.set_rank("train", 1, 1, phase="Unknown")
    d = w.step(5)
    assert [f.reason for f in d.status.faults] == ["NodeLost"]
    assert d.status.faulty_nodes == ["node-1"]
    assert "(and 1 more pod(s))" in d.status.message


def test_unknown_nodes_count_as_healthy() -> None:
    w = running_world()
    w.observed = replace(w.observed, nodes={})  # a brand-new node the shell has not seen yet
    d = w.step(5)
    assert d.status.phase == "Training" and d.deleted == []


@pytest.mark.parametrize(
    ("exit_code", "message"),
    [
        (78, {"reason": "ConfigError", "message": "tokenizer vocab 32000 != model vocab 128256"}),
        (65, {}),
        (1, {"permanent": True, "reason": "DataError", "message": "dataset too small"}),
    ],
)
def test_permanent_trainer_error_fails_without_restart(
    exit_code: int, message: dict[str, Any]
) -> None:
    w = running_world()
    w.set_rank("train", 1, 0, phase="Failed", exit_code=exit_code, termination_message=message)
    d = w.step(5)
    st = d.status
    assert st.phase == "Failed" and st.restarts == 0 and st.restart_after is None
    failed = cond(d, "Failed")
    assert failed.reason == "TrainerError"
    assert f"exit code {exit_code}" in failed.message
    if message.get("message"):
        assert message["message"] in failed.message and message["message"] in st.message
    assert st.faults[-1].reason == "TrainerError"
    # The still-running ranks go; the failed pod stays for its logs.
    assert sorted(d.deleted) == [name("train", 1, r) for r in (1, 2, 3)]
    assert events(d) == [("Warning", "Failed")]
    assert d.events[0].message.startswith("TrainerError: ")
    assert_fixed_point(w.job, w.observed, d, w.now)


def test_max_restarts_exhausted_fails_the_job() -> None:
    w = running_world(maxRestarts=2)
    w.job = with_status(w.job, w.job.status.model_copy(update={"restarts": 2, "attempt": 3}))
    w.observed = replace(w.observed, pods=tuple(gang("train", 3)))
    w.step()
    w.set_rank("train", 3, 1, phase="Failed", exit_code=1)
    d = w.step(5)
    assert d.status.phase == "Failed"
    failed = cond(d, "Failed")
    assert failed.reason == "BackoffLimitExceeded"
    assert "maxRestarts 2" in failed.message
    assert events(d) == [("Warning", "PodFailed"), ("Warning", "Failed")]
    assert sorted(d.deleted) == [name("train", 3, r) for r in (0, 2, 3)]
    # A finished job's leftovers keep their grace period, time to save on SIGTERM.
    assert {a.grace_seconds for a in d.actions if isinstance(a, DeletePods)} == {None}


def test_zero_max_restarts_fails_on_the_first_fault() -> None:
    w = running_world(maxRestarts=0)
    w.set_rank("train", 1, 0, phase="Failed", exit_code=137, reason="OOMKilled")
    d = w.step(5)
    assert d.status.phase == "Failed" and cond(d, "Failed").reason == "BackoffLimitExceeded"


# --- restarting ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "restarts", "expected"),
    [(30, 0, 30), (30, 1, 60), (30, 2, 120), (30, 4, 480), (30, 5, 600), (30, 50, 600),
     (0, 3, 0), (1000, 0, 600), (7, 1000, 600)],
)  # fmt: skip
def test_backoff_doubles_and_caps(base: int, restarts: int, expected: float) -> None:
    assert rc.backoff_seconds(base, restarts) == expected


def test_backoff_in_status_follows_the_restart_count() -> None:
    w = running_world(backoffSeconds=60)
    w.job = with_status(w.job, w.job.status.model_copy(update={"restarts": 2, "attempt": 3}))
    w.observed = replace(w.observed, pods=tuple(gang("train", 3)))
    w.step()
    w.set_rank("train", 3, 0, phase="Failed", exit_code=1)
    d = w.step(5)
    assert parse_time(d.status.restart_after) == w.now + timedelta(seconds=240)
    assert d.requeue_after == 240


def test_restart_waits_for_backoff_and_old_pods_then_avoids_the_faulty_node() -> None:
    w = running_world()
    w.set_rank("train", 1, 2, phase="Failed", reason="Evicted")
    d = w.step(5)
    assert d.status.phase == "Restarting"

    # Backoff not over: nothing but a requeue for the rest of it.
    d = w.step(10)
    assert d.creates == [] and d.events == []
    assert d.requeue_after == pytest.approx(20)

    # Backoff over, but old pods are still terminating (holding their nodes).
    w.set("train", 1, phase="Running")
    w.set_rank("train", 1, 2, phase="Failed")
    d = w.step(30)
    assert d.status.phase == "Restarting" and d.creates == []

    w.gc()
    d = w.step(1)
    st = d.status
    assert (st.phase, st.attempt, st.restarts) == ("Training", 2, 1)
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(NODES)]
    assert events(d) == [("Normal", "Restarting")]
    assert "attempt 2" in d.events[0].message and "node-2" in d.events[0].message
    for c in d.created_pods:
        assert avoided_nodes(c.manifest) == ["node-2"]
    assert cond(d, "Running").status == "False"
    assert_fixed_point(w.job, w.observed, d, w.now)

    # The new gang forms; the restart count shows; later faults keep the history.
    w.schedule("train", 2)
    d = w.step(10)
    assert cond(d, "Running").status == "True" and d.status.restarts == 1


def test_node_verdict_arriving_after_the_pod_failure_still_marks_the_node() -> None:
    """The pod's failure is seen first (a plain crash); the HyperPod label on its node arrives
    during the backoff. The node is still recorded, reported and avoided."""
    w = running_world()
    w.set_rank("train", 1, 2, phase="Failed", exit_code=137, reason="Error")
    d = w.step(1)
    assert d.status.faulty_nodes == [] and d.status.faults[-1].reason == "PodFailed"
    sick = {"node-2": NodeHealth("node-2", False, "UnschedulablePendingReplacement")}
    w.observed = replace(w.observed, nodes=sick)
    d = w.step(5)
    assert d.status.phase == "Restarting" and d.status.faulty_nodes == ["node-2"]
    assert [(f.reason, f.node) for f in d.status.faults] == [
        ("PodFailed", "node-2"),
        ("NodeUnhealthy", "node-2"),
    ]
    assert events(d) == [("Warning", "NodeFault")]
    assert_fixed_point(w.job, w.observed, d, w.now)
    w.observed = replace(w.observed, pods=())
    d = w.step(30)
    assert d.status.attempt == 2
    terms = d.created_pods[0].manifest["spec"]["affinity"]["nodeAffinity"]
    assert "node-2" in str(terms)


def test_avoid_faulty_nodes_off_records_but_does_not_avoid() -> None:
    w = running_world(avoidFaultyNodes=False)
    w.set_rank("train", 1, 0, phase="Unknown")
    d = w.step(1)
    assert d.status.faulty_nodes == [] and d.status.faults[-1].node == "node-0"
    w.gc()
    w.observed = replace(w.observed, pods=())
    d = w.step(31)
    assert d.status.attempt == 2
    assert "nodeAffinity" not in d.created_pods[0].manifest["spec"]["affinity"]


def test_pods_stuck_on_a_dead_node_do_not_block_the_restart() -> None:
    w = running_world()
    dead = {"node-3": NodeHealth("node-3", False, "NodeGone")}
    w.observed = replace(w.observed, nodes=dead)
    w.step(1)
    # Everyone else is gone; rank 3 stays "Running" + deleting forever on the vanished node.
    w.observed = replace(w.observed, pods=tuple(p for p in w.observed.pods if p.rank == 3))
    assert w.observed.pods[0].deleting
    d = w.step(31)
    assert d.status.attempt == 2 and len(d.created_pods) == NODES


def test_compile_fault_restarts_the_compile() -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.step()
    w.set_rank("compile", 1, 1, phase="Failed", exit_code=1)
    assert w.step(5).status.phase == "Restarting"
    w.gc()
    w.observed = replace(w.observed, pods=())
    d = w.step(30)
    assert (d.status.phase, d.status.attempt) == ("Compiling", 2)
    assert [c.name for c in d.created_pods] == [name("compile", 2, r) for r in range(NODES)]
    assert events(d) == [("Normal", "Restarting")]


def test_training_fault_after_compile_does_not_compile_again() -> None:
    w = World(make_job())
    w.step()
    w.set("compile", 1, phase="Succeeded", exit_code=0)
    w.step(5)
    w.schedule("train", 1)
    w.step(5)
    w.set_rank("train", 1, 0, phase="Failed", exit_code=1)
    w.step(5)
    w.gc()
    w.observed = replace(w.observed, pods=())
    d = w.step(30)
    assert (d.status.phase, d.status.attempt) == ("Training", 2)
    assert {c.role for c in d.created_pods} == {"train"}


def test_pods_of_a_lost_attempt_are_adopted() -> None:
    """The operator created attempt 2 and crashed before writing the status."""
    w = running_world()
    w.set_rank("train", 1, 0, phase="Failed", exit_code=1)
    w.step(1)
    w.observed = obs(gang("train", 2))
    d = w.step(5)
    assert (d.status.phase, d.status.attempt, d.status.restarts) == ("Training", 2, 1)
    assert d.creates == [] and d.deleted == []


# --- hang detection and progress ---------------------------------------------------------------
def progress(step: int | None, at: datetime, **kw: Any) -> Progress:
    base: dict[str, Any] = {
        "loss": None, "tokens_per_second": None, "mfu": None,
        "last_checkpoint_step": None, "max_steps": None,
    }  # fmt: skip
    base.update(kw)
    return Progress(step=step, observed_at=at, **base)


def test_unschedulable_gang_says_why_with_one_event() -> None:
    w = World(make_job(compile_=False))
    w.step()
    full = "0/3 nodes are available: 3 Insufficient aws.amazon.com/neuron."
    w.set_rank("train", 1, 3, unschedulable=full)
    d = w.step(10)
    running = cond(d, "Running")
    assert (running.status, running.reason) == ("False", "PodsUnschedulable")
    assert d.status.message == (
        f"attempt 1: 0/{NODES} training pod(s) running; 1 pod(s) cannot be scheduled, "
        f"e.g. {name('train', 1, 3)}: {full}"
    )
    assert events(d) == [("Warning", "Unschedulable")] and d.creates == [] and d.deleted == []
    # Still stuck with another scheduler message: the condition follows, no second event.
    w.set_rank("train", 1, 3, unschedulable="0/4 nodes are available: 4 node(s) didn't match.")
    d = w.step(10)
    assert "4 node(s) didn't match" in d.status.message and d.events == []
    # Capacity arrives.
    w.set_rank("train", 1, 3, unschedulable=None)
    w.schedule("train", 1)
    d = w.step(10)
    assert (cond(d, "Running").status, cond(d, "Running").reason) == ("True", "AllPodsRunning")
    assert "cannot be scheduled" not in d.status.message


# --- spec edits -----------------------------------------------------------------------------------
def edit(w: World, change: Any) -> None:
    """The user edits the spec (kubectl edit / apply): a new generation, the status kept."""
    obj = w.job.model_dump(by_alias=True, exclude_none=True, exclude={"status"})
    change(obj["spec"])
    obj["metadata"]["generation"] += 1
    w.job = with_status(parse_job(obj), w.job.status)


def max_steps(n: int) -> Any:
    return lambda spec: spec.update(maxSteps=n)


def trainer_config_of(create: CreateObject) -> dict[str, Any]:
    return yaml.safe_load(create.manifest["data"]["config.yaml"])


def test_spec_edit_restarts_the_gang_with_the_new_spec_without_counting_a_fault() -> None:
    w = running_world()
    old_revision = w.job.status.revision
    assert old_revision == render.spec_revision(w.job)
    edit(w, max_steps(2000))
    d = w.step(5)
    st = d.status
    assert (st.phase, st.attempt, st.restarts, st.faults) == ("Restarting", 1, 0, [])
    assert st.observed_generation == 2
    assert (cond(d, "Running").status, cond(d, "Running").reason) == ("False", "SpecChanged")
    assert events(d) == [("Normal", "SpecChanged")]
    assert "generation 2" in d.events[0].message and "attempt 2" in d.events[0].message
    assert "the trainer saves its current step" in d.events[0].message
    # The whole gang goes, with the pods' own grace period: the trainer saves its step.
    deletes = [a for a in d.actions if isinstance(a, DeletePods)]
    assert len(deletes) == 1 and deletes[0].grace_seconds is None
    assert sorted(deletes[0].names) == [name("train", 1, r) for r in range(NODES)]
    # The new revision's config is written beside the old one, which the old pods still mount.
    new_revision = render.spec_revision(w.job)
    assert [c.name for c in d.creates] == [render.configmap_name("demo", new_revision)]
    assert trainer_config_of(d.creates[0])["maxSteps"] == 2000
    assert_fixed_point(w.job, w.observed, d, w.now)

    # No backoff, but the old pods must stop first (they are saving).
    d = w.step(1)
    assert d.status.phase == "Restarting" and d.creates == [] and d.deleted == []
    w.gc()
    d = w.step(30)
    st = d.status
    assert (st.phase, st.attempt, st.restarts, st.revision) == ("Training", 2, 0, new_revision)
    assert st.max_steps == 2000
    assert events(d) == [("Normal", "TrainingStarted")]
    for c in d.created_pods:
        assert c.manifest["metadata"]["labels"]["llamajob.dev/revision"] == new_revision
        volume = next(v for v in c.manifest["spec"]["volumes"] if "configMap" in v)
        assert volume["configMap"]["name"] == render.configmap_name("demo", new_revision)
    assert_fixed_point(w.job, w.observed, d, w.now)


def test_restart_policy_edit_applies_without_touching_the_gang() -> None:
    w = running_world()
    revision = w.job.status.revision
    edit(w, lambda spec: spec["restartPolicy"].update(maxRestarts=0))
    d = w.step(5)
    assert d.status.phase == "Training" and d.status.revision == revision
    assert d.status.observed_generation == 2
    assert d.creates == [] and d.deleted == [] and d.events == []
    # It is in force at once: the next fault fails the job instead of restarting it.
    w.set_rank("train", 1, 2, phase="Failed", exit_code=1)
    d = w.step(5)
    assert (d.status.phase, cond(d, "Failed").reason) == ("Failed", "BackoffLimitExceeded")


def test_spec_edit_with_compile_enabled_runs_the_compile_step_again() -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.step()
    w.set("compile", 1, phase="Succeeded", exit_code=0,
          termination_message={"compileCached": False, "compileKey": "k1"})
    w.step(30)
    w.schedule("train", 1)
    w.step(10)
    edit(w, lambda spec: spec["batch"].update(microBatchSize=2, globalBatchSize=4 * NODES))
    assert w.step(5).status.phase == "Restarting"
    w.gc()
    d = w.step(1)
    st = d.status
    assert (st.phase, st.attempt, st.restarts) == ("Compiling", 2, 0)
    compiled = cond(d, "Compiled")
    assert (compiled.status, compiled.message) == ("False", "attempt 2: compiling (spec changed)")
    spec = w.job.spec
    assert st.compile_key == spec.compile_key("torch", spec.cluster.image, "cpu") != "k1"
    assert [c.name for c in d.created_pods] == [name("compile", 2, r) for r in range(NODES)]
    assert events(d) == [("Normal", "CompileStarted")]


def test_spec_edit_that_keeps_the_compile_key_skips_the_compile_step() -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.step()
    w.set("compile", 1, phase="Succeeded", exit_code=0, termination_message={})
    w.step(30)
    w.schedule("train", 1)
    w.step(10)
    key = w.job.status.compile_key
    edit(w, max_steps(2000))
    assert w.step(5).status.phase == "Restarting"
    w.gc()
    d = w.step(1)
    assert (d.status.phase, d.status.attempt, d.status.compile_key) == ("Training", 2, key)
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(NODES)]


def test_edit_that_disables_compile_during_the_compile_step_goes_to_training() -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.step(10)
    edit(w, lambda spec: spec["compile"].update(enabled=False))
    d = w.step(5)
    assert d.status.phase == "Restarting" and "saves" not in d.status.message
    w.gc()
    d = w.step(1)
    assert (d.status.phase, d.status.attempt, d.status.restarts) == ("Training", 2, 0)
    assert (cond(d, "Compiled").status, cond(d, "Compiled").reason) == ("True", "CompileDisabled")
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(NODES)]


def test_spec_edit_that_grows_the_gang_is_not_a_missing_pod() -> None:
    w = running_world()

    def grow(spec: dict[str, Any]) -> None:
        spec["cluster"]["nodes"] = 2 * NODES
        spec["batch"]["globalBatchSize"] = 4 * NODES

    edit(w, grow)
    d = w.step(5)
    assert d.status.phase == "Restarting" and d.status.faults == []
    assert (cond(d, "Running").reason, events(d)) == ("SpecChanged", [("Normal", "SpecChanged")])
    w.gc()
    d = w.step(1)
    assert (d.status.attempt, d.status.pods, d.status.restarts) == (2, 2 * NODES, 0)
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(2 * NODES)]


def test_fault_during_a_spec_edit_is_a_fault_restart_with_the_new_spec() -> None:
    w = running_world(backoffSeconds=0)
    edit(w, max_steps(2000))
    w.set_rank("train", 1, 2, phase="Failed", exit_code=1)
    d = w.step(5)
    assert (d.status.phase, cond(d, "Running").reason) == ("Restarting", "Restarting")
    assert [f.reason for f in d.status.faults] == ["PodFailed"]
    deletes = [a for a in d.actions if isinstance(a, DeletePods)]
    assert deletes[0].grace_seconds == rc.RESTART_GRACE_SECONDS  # survivors cannot save
    w.gc()
    d = w.step(1)
    st = d.status
    assert (st.phase, st.attempt, st.restarts) == ("Training", 2, 1)
    assert st.revision == render.spec_revision(w.job) and st.max_steps == 2000


def test_edit_that_breaks_the_spec_fails_the_job_and_fixing_it_starts_the_next_attempt() -> None:
    w = running_world()
    edit(w, lambda spec: spec["parallelism"].update(tensor=3))
    d = w.step(5)
    assert (d.status.phase, cond(d, "Failed").reason) == ("Failed", "InvalidSpec")
    assert "spec.parallelism.tensor" in d.status.message
    deletes = [a for a in d.actions if isinstance(a, DeletePods)]
    assert deletes[0].grace_seconds is None  # the trainer saves on its way out
    # The old pods are still terminating when the user fixes the spec.
    edit(w, lambda spec: spec["parallelism"].update(tensor=1))
    d = w.step(5)
    st = d.status
    assert (st.phase, st.attempt, st.restarts) == ("Training", 2, 0)
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(NODES)]
    assert cond(d, "Failed") is None


def test_trainer_error_job_starts_again_once_the_spec_is_edited() -> None:
    w = running_world()
    w.set_rank("train", 1, 0, phase="Failed", exit_code=protocol.EXIT_CONFIG,
               termination_message={"reason": "CheckpointError", "message": "different model"})
    d = w.step(5)
    assert (d.status.phase, cond(d, "Failed").reason) == ("Failed", "TrainerError")
    assert w.step(60).actions == ()  # the same generation: stays failed
    w.gc()
    edit(w, lambda spec: spec["checkpoint"].update(dir="/fsx/checkpoints/demo-v2"))
    d = w.step(5)
    assert (d.status.phase, d.status.attempt) == ("Training", 2)
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(NODES)]
    assert [f.reason for f in d.status.faults] == ["TrainerError"]  # history kept


def test_gang_started_before_revisions_existed_is_adopted_not_restarted() -> None:
    w = running_world()
    w.job = with_status(w.job, w.job.status.model_copy(update={"revision": None}))
    d = w.step(5)
    assert d.status.phase == "Training" and d.deleted == [] and d.events == []
    assert d.status.revision == render.spec_revision(w.job)


def test_hang_without_progress_restarts_the_gang() -> None:
    w = running_world()  # gang formed at T0+10s; hangTimeoutSeconds 600
    w.observed = replace(w.observed, progress=progress(5, w.now))
    d = w.step(0)
    assert d.status.step == 5
    d = w.step(599)  # same step still
    assert d.status.phase == "Training"
    assert d.requeue_after == pytest.approx(1)
    d = w.step(1)
    assert d.status.phase == "Restarting"
    fault = d.status.faults[-1]
    assert (fault.reason, fault.pod, fault.node) == ("Hang", name("train", 1, 0), "node-0")
    assert "600 s" in fault.message and "step 5" in fault.message
    assert d.status.faulty_nodes == []  # a hang does not blame a node
    assert events(d) == [("Warning", "Hang")]
    assert len(d.deleted) == NODES


def test_progress_resets_the_hang_timer() -> None:
    w = running_world()
    for k in range(1, 5):
        w.observed = replace(w.observed, progress=progress(k, w.now + timedelta(seconds=500)))
        d = w.step(500)
        assert d.status.phase == "Training", k
    assert d.requeue_after == pytest.approx(600)


def test_hang_timer_counts_from_the_gang_forming_not_pod_creation() -> None:
    w = World(make_job(compile_=False))
    w.step()
    d = w.step(3600)  # an hour Pending (no nodes free) is not a hang
    assert d.status.phase == "Training" and d.requeue_after is None
    w.schedule("train", 1)
    d = w.step(1)
    assert d.requeue_after == pytest.approx(600)


def test_hang_detection_disabled_with_zero_timeout() -> None:
    w = running_world(hangTimeoutSeconds=0)
    d = w.step(100000)
    assert d.status.phase == "Training" and d.requeue_after is None


def test_progress_is_copied_with_an_eta_from_the_step_rate() -> None:
    w = running_world()
    t = w.now
    w.observed = replace(
        w.observed,
        progress=progress(100, t, loss=2.5, tokens_per_second=4096.0, mfu=0.31,
                          last_checkpoint_step=100, validation_loss=2.75, process_restarts=1),
    )  # fmt: skip
    d = w.step(0)
    st = d.status
    assert st.validation_loss == 2.75 and st.process_restarts == 1
    assert (st.step, st.loss, st.tokens_per_second, st.mfu, st.last_checkpoint_step) == (
        100,
        2.5,
        4096.0,
        0.31,
        100,
    )
    # No interval yet: ETA from throughput, 900 steps x 8 seqs x 128 tokens / 4096 tokens/s.
    assert st.eta_seconds == pytest.approx(900 * 8 * 128 / 4096)
    assert events(d) == [("Normal", "CheckpointSaved")]
    assert st.message.endswith("step 100/1000")

    w.observed = replace(w.observed, progress=progress(110, t + timedelta(seconds=100), loss=2.4))
    d = w.step(100)
    assert d.status.eta_seconds == pytest.approx(890 / 0.1)
    assert d.status.last_progress_time == "2025-03-01T12:01:50Z"
    assert d.status.loss == 2.4 and d.status.last_checkpoint_step == 100
    assert d.status.validation_loss == 2.75  # kept until the next evaluation
    assert d.events == []  # same checkpoint: no second event


def test_progress_ignored_outside_training() -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.observed = replace(w.observed, progress=progress(3, w.now, loss=9.0))
    d = w.step(1)
    assert d.status.step is None and d.status.loss is None


# --- suspend --------------------------------------------------------------------------------------
def suspend(on: bool) -> Any:
    return lambda spec: spec.update(suspend=on)


def test_suspend_stops_the_gang_so_it_saves_and_resume_starts_the_next_attempt() -> None:
    w = running_world()
    revision = w.job.status.revision
    w.observed = replace(w.observed, progress=progress(40, w.now, last_checkpoint_step=30))
    edit(w, suspend(True))
    d = w.step(5)
    st = d.status
    assert (st.phase, st.attempt, st.restarts, st.faults, st.revision) == (
        "Suspended", 1, 0, [], revision)  # not an edit: the revision stays
    assert (st.step, st.last_checkpoint_step) == (40, 30)  # progress up to the suspension
    assert (cond(d, "Suspended").status, cond(d, "Running").reason) == ("True", "Suspended")
    assert events(d) == [("Normal", "Suspended"), ("Normal", "CheckpointSaved")]
    assert "the trainer saves its current step" in d.events[0].message
    deletes = [a for a in d.actions if isinstance(a, DeletePods)]
    assert len(deletes) == 1 and deletes[0].grace_seconds is None  # the pods' own grace period
    assert sorted(deletes[0].names) == [name("train", 1, r) for r in range(NODES)]
    assert d.creates == []
    assert st.message == f"suspended (spec.suspend is true); {NODES} pod(s) still stopping"
    assert_fixed_point(w.job, w.observed, d, w.now)

    # The pods save and exit 143 (SIGTERM); while suspended that is no fault.
    w.set("train", 1, phase="Failed", exit_code=143)
    d = w.step(60)
    assert d.status.phase == "Suspended" and d.status.faults == [] and d.events == []
    assert d.status.message == "suspended (spec.suspend is true)"
    w.gc()
    d = w.step(3600)  # a long suspension: no requeue, no pods, nothing to do
    assert d.creates == [] and d.deleted == [] and d.events == [] and d.requeue_after is None

    edit(w, suspend(False))
    d = w.step(5)
    st = d.status
    assert (st.phase, st.attempt, st.restarts, st.revision) == ("Training", 2, 0, revision)
    assert (cond(d, "Suspended").status, cond(d, "Suspended").reason) == ("False", "Resumed")
    assert events(d) == [("Normal", "Resumed"), ("Normal", "TrainingStarted")]
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(NODES)]
    assert_fixed_point(w.job, w.observed, d, w.now)


def test_resume_waits_for_the_suspended_pods_to_stop() -> None:
    w = running_world()
    edit(w, suspend(True))
    w.step(5)
    edit(w, suspend(False))  # back on before the old pods finished saving
    d = w.step(1)
    assert d.status.phase == "Suspended" and d.creates == [] and d.events == []
    assert d.status.message == "resuming: waiting for the suspended pods to stop"
    w.gc()
    d = w.step(1)
    assert (d.status.phase, d.status.attempt) == ("Training", 2) and len(d.created_pods) == NODES


def test_job_created_suspended_is_validated_and_starts_nothing() -> None:
    job = make_job()
    obj = job.model_dump(by_alias=True, exclude_none=True)
    obj["spec"]["suspend"] = True
    w = World(parse_job(obj))
    d = w.step()
    assert (d.status.phase, d.status.attempt) == ("Suspended", 0)
    assert cond(d, "Validated").status == "True" and d.created_pods == []
    assert cond(d, "Suspended").message == "spec.suspend is true: no attempt starts while it is"
    assert events(d) == [("Normal", "Validated"), ("Normal", "Suspended")]
    assert d.status.start_time is None
    edit(w, suspend(False))
    d = w.step(5)
    assert (d.status.phase, d.status.attempt) == ("Compiling", 1)
    assert [c.name for c in d.created_pods] == [name("compile", 1, r) for r in range(NODES)]
    assert d.status.start_time is not None


def test_invalid_job_created_suspended_still_fails() -> None:
    obj = make_job().model_dump(by_alias=True, exclude_none=True)
    obj["spec"].update(suspend=True)
    obj["spec"]["parallelism"]["tensor"] = 3
    d = reconcile(parse_job(obj), Observed(), T0)
    assert d.status.phase == "Failed" and cond(d, "Failed").reason == "InvalidSpec"


def test_suspend_during_the_compile_step_compiles_again_on_resume() -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.step(1)
    edit(w, suspend(True))
    d = w.step(5)
    assert d.status.phase == "Suspended" and cond(d, "Compiled").status == "False"
    assert sorted(d.deleted) == [name("compile", 1, r) for r in range(NODES)]
    assert "the trainer saves" not in cond(d, "Suspended").message  # nothing to save
    w.gc()
    edit(w, suspend(False))
    d = w.step(5)
    assert (d.status.phase, d.status.attempt) == ("Compiling", 2)


def test_suspend_as_the_compile_step_finishes_keeps_its_result() -> None:
    w = World(make_job())
    w.step()
    w.schedule("compile", 1)
    w.step(1)
    w.set("compile", 1, phase="Succeeded", exit_code=0,
          termination_message={"compileCached": False, "compileKey": "k1"})
    edit(w, suspend(True))
    d = w.step(5)
    assert d.status.phase == "Suspended" and cond(d, "Compiled").status == "True"
    assert "the trainer saves" not in cond(d, "Suspended").message  # no training pod ran
    w.gc()
    edit(w, suspend(False))
    d = w.step(5)
    assert (d.status.phase, d.status.attempt) == ("Training", 2)


def test_suspend_as_training_finishes_is_a_success() -> None:
    w = running_world()
    w.set("train", 1, phase="Succeeded", exit_code=0)
    edit(w, suspend(True))
    d = w.step(5)
    assert d.status.phase == "Succeeded" and cond(d, "Suspended") is None


def test_suspend_during_a_fault_backoff_and_resume_without_it() -> None:
    w = running_world()
    w.set_rank("train", 1, 2, phase="Failed", exit_code=1)
    d = w.step(5)
    assert d.status.phase == "Restarting" and d.requeue_after == 30
    edit(w, suspend(True))
    d = w.step(1)
    assert d.status.phase == "Suspended" and d.status.restart_after is None
    assert d.requeue_after is None
    w.gc()
    edit(w, suspend(False))
    d = w.step(1)  # well inside the backoff: a resume is not a fault restart
    st = d.status
    assert (st.phase, st.attempt, st.restarts) == ("Training", 2, 0)
    assert [f.reason for f in st.faults] == ["PodFailed"]  # the history stays


def test_suspended_job_ignores_spec_edits_until_resumed() -> None:
    w = running_world()
    edit(w, suspend(True))
    w.step(5)
    w.gc()
    edit(w, max_steps(2000))
    d = w.step(5)
    assert d.status.phase == "Suspended" and d.created_pods == [] and d.events == []
    revision = render.spec_revision(w.job)
    assert [trainer_config_of(c)["maxSteps"] for c in d.creates] == [2000]  # ready, unused
    edit(w, suspend(False))
    d = w.step(5)
    st = d.status
    assert (st.phase, st.attempt, st.max_steps, st.revision) == ("Training", 2, 2000, revision)
    assert render.spec_revision(w.job) == revision
    for c in d.created_pods:
        volume = next(v for v in c.manifest["spec"]["volumes"] if "configMap" in v)
        assert volume["configMap"]["name"] == render.configmap_name("demo", revision)


def test_pods_that_cannot_start_say_why_with_one_event_until_they_run() -> None:
    w = World(make_job(compile_=False))
    w.step()
    w.schedule("train", 1)
    w.set("train", 1, phase="Pending")
    secret = 'CreateContainerConfigError: secret "hf" not found'
    w.set_rank("train", 1, 1, not_starting=secret)
    d = w.step(10)
    running = cond(d, "Running")
    assert (running.status, running.reason) == ("False", "PodsNotStarting")
    assert d.status.message == (
        f"attempt 1: 0/{NODES} training pod(s) running; 1 pod(s) cannot start, e.g. "
        f"{name('train', 1, 1)}: {secret}"
    )
    assert events(d) == [("Warning", "PodsNotStarting")] and d.creates == [] and d.deleted == []
    assert d.status.phase == "Training" and d.status.faults == []  # waits: no fault, no restart
    # Between two retries the kubelet's reason blanks out: no flip, no second event.
    w.set_rank("train", 1, 1, not_starting=None)
    d = w.step(10)
    assert cond(d, "Running").reason == "PodsNotStarting" and d.events == []
    w.set_rank("train", 1, 1, not_starting='ImagePullBackOff: Back-off pulling image "x"')
    d = w.step(10)
    assert "ImagePullBackOff" in d.status.message and d.events == []
    # The user fixes it; the gang runs.
    w.set_rank("train", 1, 1, not_starting=None)
    w.schedule("train", 1)
    d = w.step(10)
    assert (cond(d, "Running").status, cond(d, "Running").reason) == ("True", "AllPodsRunning")
    assert "cannot start" not in d.status.message


@pytest.mark.parametrize("reason", ["InvalidImageName", "ErrImageNeverPull"])
def test_an_image_that_can_never_start_fails_the_job_naming_the_field(reason: str) -> None:
    w = World(make_job(compile_=False))
    w.step()
    w.schedule("train", 1)
    w.set("train", 1, phase="Pending")
    w.set_rank("train", 1, 2, not_starting=f"{reason}: couldn't parse image reference")
    d = w.step(10)
    st = d.status
    assert (st.phase, cond(d, "Failed").reason, st.restarts) == ("Failed", "InvalidSpec", 0)
    assert st.message.startswith(f"spec.cluster.image: pod {name('train', 1, 2)}: ")
    assert reason in st.message and "Fix spec.cluster.image" in st.message
    assert events(d) == [("Warning", "Failed")]  # one event, not a fault event besides
    assert sorted(d.deleted) == [name("train", 1, r) for r in range(NODES)]
    # Fixing the image (an edit) starts the next attempt.
    edit(w, lambda spec: spec["cluster"].update(image="ghcr.io/llamajob/trainer:0.1.1"))
    d = w.step(5)
    assert (d.status.phase, d.status.attempt) == ("Training", 2)


# --- level-triggered, idempotent, events only on transitions -------------------------------------
def test_whole_life_reaches_a_fixed_point_at_every_step() -> None:
    """Drive a job through compile, training, a node fault, a restart and success; after every
    step, reconciling again changes nothing and emits nothing."""
    w = World(make_job())
    script = [
        lambda: None,
        lambda: w.schedule("compile", 1),
        lambda: w.set("compile", 1, phase="Succeeded", exit_code=0,
                      termination_message={"compileCached": True}),
        lambda: w.gc(),
        lambda: w.schedule("train", 1),
        lambda: setattr(w, "observed", replace(w.observed, progress=progress(
            10, w.now, last_checkpoint_step=10))),
        lambda: setattr(w, "observed", replace(w.observed, nodes={
            "node-1": NodeHealth("node-1", False, "UnschedulablePendingReboot")})),
        lambda: (w.gc(), w.set("train", 1, phase="Failed")),
        lambda: setattr(w, "observed", replace(w.observed, pods=(), nodes={})),
        lambda: w.schedule("train", 2),
        lambda: w.set("train", 2, phase="Succeeded", exit_code=0),
    ]  # fmt: skip
    all_events: list[str] = []
    for change in script:
        change()
        d = w.step(40)
        all_events += [e.reason for e in d.events]
        assert_fixed_point(w.job, w.observed, d, w.now)
    assert w.job.status.phase == "Succeeded"
    assert w.job.status.attempt == 2 and w.job.status.restarts == 1
    assert all_events == [
        "Validated", "CompileStarted", "CompileSkipped", "TrainingStarted", "CheckpointSaved",
        "NodeFault", "Restarting", "Succeeded",
    ]  # fmt: skip


def test_same_call_twice_repeats_only_idempotent_requests_and_no_events() -> None:
    """With an unchanged observation (the watch has not caught up) the second call asks again
    for the same pods by the same names, changes no status and emits no event."""
    job = make_job()
    first = reconcile(job, Observed(), T0)
    second = reconcile(with_status(job, first.status), Observed(), T0)
    assert second.events == [] and second.status == first.status
    assert [c.name for c in second.creates] == [c.name for c in first.creates]
    w = running_world()
    w.set_rank("train", 1, 0, phase="Failed", exit_code=1)
    before = w.observed
    d1 = w.step(1)
    d2 = reconcile(w.job, before, w.now)
    assert d2.events == [] and d2.status == d1.status and d2.creates == []
    assert sorted(d2.deleted) == sorted(d1.deleted)


def test_replayed_terminal_state_emits_nothing() -> None:
    w = running_world()
    w.set("train", 1, phase="Succeeded", exit_code=0)
    d = w.step(1)
    assert events(d) == [("Normal", "Succeeded")]
    for dt in (0, 1, 3600):
        again = reconcile(w.job, w.observed, w.now + timedelta(seconds=dt))
        assert again.actions == () and again.status == d.status


def test_failed_job_cleans_up_leftover_running_pods_only() -> None:
    w = running_world()
    w.set_rank("train", 1, 0, phase="Failed", exit_code=78)
    w.step(1)
    # A pod the operator did not know about (or a delete that was lost) is still running.
    w.observed = obs([*gang("train", 1, "Failed")[:1], *gang("train", 1)[1:]])
    d = w.step(60)
    assert d.status.phase == "Failed"
    assert sorted(d.deleted) == [name("train", 1, r) for r in (1, 2, 3)]
    assert d.events == [] and d.creates == []


def test_service_and_configmap_recreated_when_missing() -> None:
    w = running_world()
    w.observed = replace(w.observed, service=False)
    d = w.step(1)
    assert [c.kind for c in d.creates] == ["Service"]
    assert d.creates[0].manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    w.observed = replace(w.observed, configmaps=frozenset())
    assert [c.kind for c in w.step(1).creates] == ["ConfigMap"]


def test_stale_pods_of_other_gangs_are_deleted() -> None:
    w = running_world()
    w.observed = replace(w.observed, pods=(*w.observed.pods, *gang("compile", 1, "Succeeded")))
    d = w.step(1)
    assert sorted(d.deleted) == [name("compile", 1, r) for r in range(NODES)]
    assert d.status.phase == "Training" and d.events == []


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    w = running_world()
    t_running = get_condition(w.job.status, "Running").last_transition_time
    t_valid = get_condition(w.job.status, "Validated").last_transition_time
    d = w.step(300)
    assert cond(d, "Running").last_transition_time == t_running
    assert cond(d, "Validated").last_transition_time == t_valid == "2025-03-01T12:00:00Z"


def test_faults_keep_only_the_most_recent() -> None:
    w = running_world(maxRestarts=50, backoffSeconds=0)
    for attempt in range(1, 14):
        w.set_rank("train", attempt, 1, phase="Failed", exit_code=1)
        assert w.step(1).status.phase == "Restarting"
        w.observed = replace(w.observed, pods=())
        d = w.step(1)
        assert d.status.attempt == attempt + 1
        w.schedule("train", attempt + 1)
        w.step(1)
    faults = w.job.status.faults
    assert len(faults) == rc.MAX_FAULTS
    assert [f.attempt for f in faults] == list(range(4, 14))


def test_no_secret_value_reaches_status_events_or_manifests() -> None:
    """The job names a Secret; its value is never known to the operator. Run a whole life and
    check that every secret env var in every created object is a reference."""
    w = World(make_job(compile_=False))
    w.step()
    w.schedule("train", 1)
    w.step(1)
    w.set("train", 1, phase="Succeeded")
    w.step(1)
    text = repr([d.actions for d in w.history]) + w.job.status.model_dump_json()
    assert SECRET_VALUE not in text
    for d in w.history:
        for c in d.created_pods:
            env = {e["name"]: e for e in c.manifest["spec"]["containers"][0]["env"]}
            assert env["HF_TOKEN"] == {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
            }


def test_status_round_trips_through_the_api_model() -> None:
    """What reconcile writes is what the shell reads back (camelCase on the wire)."""
    w = running_world()
    w.set_rank("train", 1, 3, phase="Unknown")
    d = w.step(1)
    wire = d.status.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert "restartAfter" in wire and "faultyNodes" in wire
    assert LlamaTrainingJobStatus.model_validate(wire) == d.status
    again = reconcile(
        with_status(w.job, LlamaTrainingJobStatus.model_validate(wire)), w.observed, w.now
    )
    assert again.events == [] and again.status == d.status


def test_actions_are_plain_values() -> None:
    d = reconcile(make_job(), Observed(), T0)
    assert all(
        isinstance(a, CreateObject | DeletePods | EmitEvent | RequeueAfter) for a in d.actions
    )
    assert isinstance(d.creates[0].manifest, dict) and d.creates[0].kind == "Service"


# --- edits against the job's own checkpoints ------------------------------------------------------
def checkpointed_world() -> World:
    """Training attempt 1 that has saved a checkpoint at step 50 (seen in rank 0's metrics)."""
    w = running_world()
    w.observed = replace(w.observed, progress=progress(60, w.now, last_checkpoint_step=50))
    st = w.step(5).status
    assert st.last_checkpoint_step == 50
    assert (st.checkpoint_dir, st.checkpoint_fingerprint) == (
        w.job.spec.checkpoint.dir, w.job.spec.training_fingerprint()
    )
    return w


MODEL_EDITS = [
    pytest.param(lambda spec: spec["model"].update(numLayers=6), id="layers"),
    pytest.param(lambda spec: spec["model"].update(hiddenSize=256), id="hidden-size"),
    pytest.param(lambda spec: spec.setdefault("data", {}).update(seqLength=256), id="seq-length"),
]


@pytest.mark.parametrize("change", MODEL_EDITS)
def test_model_edit_against_saved_checkpoints_fails_at_once_and_reverting_resumes(
    change: Any,
) -> None:
    w = checkpointed_world()
    saved = w.job.status.checkpoint_fingerprint
    edit(w, change)
    d = w.step(5)
    assert (d.status.phase, cond(d, "Failed").reason) == ("Failed", "InvalidSpec")
    message = d.status.message
    assert message.startswith(
        "spec.model: this job's checkpoints in checkpoints (newest at step 50) hold another model"
    )
    assert saved in message and w.job.spec.training_fingerprint() in message
    assert "spec.checkpoint.dir" in message and "Revert" in message
    # No compile and no gang for the new model; the running pods leave with their own grace
    # period, so the trainer saves the step it is on.
    assert d.created_pods == []
    deletes = [a for a in d.actions if isinstance(a, DeletePods)]
    assert deletes[0].grace_seconds is None
    assert sorted(deletes[0].names) == [name("train", 1, r) for r in range(NODES)]
    assert events(d) == [("Warning", "Failed")]

    # Reverting the edit (a new generation with the old model) resumes in the next attempt.
    w.gc()
    edit(w, lambda spec: spec.update(model={"preset": "tiny"}, data={}))
    assert w.job.spec.training_fingerprint() == saved
    d = w.step(5)
    st = d.status
    assert (st.phase, st.attempt) == ("Training", 2)
    assert [c.name for c in d.created_pods] == [name("train", 2, r) for r in range(NODES)]
    # What is known of the checkpoints survives the restart, so the check still holds.
    assert (st.checkpoint_fingerprint, st.last_checkpoint_step) == (saved, 50)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda spec: (
                spec["model"].update(numLayers=6),
                spec["checkpoint"].update(dir="/fsx/checkpoints/demo-6-layers"),
            ),
            id="model-and-new-dir",
        ),
        pytest.param(
            lambda spec: (
                spec["model"].update(numLayers=6), spec["checkpoint"].update(resume="none")
            ),
            id="model-and-no-resume",
        ),
        pytest.param(max_steps(2000), id="same-model"),
    ],
)
def test_edits_the_checkpoints_can_take_are_planned_restarts(change: Any) -> None:
    w = checkpointed_world()
    edit(w, change)
    d = w.step(5)
    assert (d.status.phase, cond(d, "Running").reason) == ("Restarting", "SpecChanged")
    w.gc()
    d = w.step(1)
    assert (d.status.phase, d.status.attempt, d.status.restarts) == ("Training", 2, 0)
    # The new gang's first checkpoint records its own directory and model.
    w.schedule("train", 2)
    w.observed = replace(w.observed, progress=progress(10, w.now, last_checkpoint_step=10))
    st = w.step(10).status
    assert (st.checkpoint_dir, st.checkpoint_fingerprint, st.last_checkpoint_step) == (
        w.job.spec.checkpoint.dir, w.job.spec.training_fingerprint(), 10
    )


def test_unedited_job_is_not_judged_against_its_recorded_fingerprint() -> None:
    """A fingerprint that reads differently without an edit (another operator version, say)
    never fails a running job: only edits are checked."""
    w = checkpointed_world()
    w.job = with_status(
        w.job, w.job.status.model_copy(update={"checkpoint_fingerprint": "0123456789abcdef"})
    )
    d = w.step(5)
    assert d.status.phase == "Training" and d.deleted == [] and d.events == []


def test_model_edit_before_any_checkpoint_is_a_planned_restart() -> None:
    w = running_world()
    assert w.job.status.checkpoint_fingerprint is None
    edit(w, MODEL_EDITS[0].values[0])
    d = w.step(5)
    assert (d.status.phase, cond(d, "Running").reason) == ("Restarting", "SpecChanged")


def test_checkpoint_seen_while_an_edit_replaces_the_gang_is_recorded_for_the_old_model() -> None:
    """The final progress read during a planned restart comes from pods of the old spec."""
    w = running_world()
    edit(w, lambda spec: (spec["model"].update(numLayers=6),
                          spec["checkpoint"].update(dir="/fsx/new")))
    w.observed = replace(w.observed, progress=progress(60, w.now, last_checkpoint_step=50))
    st = w.step(5).status
    assert st.phase == "Restarting" and st.last_checkpoint_step == 50
    assert st.checkpoint_fingerprint is None
