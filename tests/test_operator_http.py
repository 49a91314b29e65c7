"""The operator over HTTP: kopf (in-process, via kopf.testing.KopfRunner) against the real
control plane (``kube_cluster``), as the Helm chart's ServiceAccount with the chart's RBAC,
driven by the real ``kubectl``.

The real scheduler places every pod; the tests play the kubelet (pod status, graceful
deletions) and stand in for rank 0's metrics endpoint with the trainer's own metrics module
served on 127.0.0.1 (every Running pod reports that IP). What this cannot show: containers
that run, and anything on Trainium.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import avoided_nodes
from kopf.testing import KopfRunner
from kube_cluster import (
    HEALTH_LABEL,
    JOB,
    Cluster,
    Identity,
    TrainerMetrics,
    apply,
    assert_permitted,
    cluster_fixture,  # noqa: F401  (the `cluster` fixture)
    condition,
    env_of,
    events,
    example,
    finish_all,
    gang,
    node_of,
    older_crd,
    operator_identity,
    pods,
    reasons,
    run_all,
    start_training,
    status,
    wait_for,
    wait_phase,
)
from llamajob import handlers, metrics, worker
from llamajob.images import TRAINER_FAMILIES

# The examples set no spec.cluster.image: like the chart's trainerImage, the operator gives one.
TRAINER_IMAGES = {f: f"registry.example/llamajob-trainer:0.1.0-{f}" for f in TRAINER_FAMILIES}


@contextlib.contextmanager
def run_operator(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, *args: str,
                 identity: Identity | None = None, **config: Any) -> Iterator[KopfRunner]:
    """kopf in this process, with the chart's cluster-scope credentials unless `identity`."""
    monkeypatch.setenv("KUBECONFIG", str((identity or cluster.operator()).kubeconfig))
    saved = handlers.CONFIG
    handlers.CONFIG = handlers.OperatorConfig(**{"progress_interval": 0.3,
                                                 "trainer_images": TRAINER_IMAGES, **config})
    scope = list(args) or ["--all-namespaces"]
    try:
        with KopfRunner(["run", "--standalone", *scope, "-m", "llamajob.handlers"],
                        timeout=60) as runner:
            yield runner
    finally:
        handlers.CONFIG = saved
    assert runner.exception is None, runner.output


@pytest.fixture
def trainer(cluster: Cluster) -> Iterator[TrainerMetrics]:
    with TrainerMetrics(JOB, cluster.namespace) as server:
        yield server


@pytest.fixture
def operator(cluster: Cluster, trainer: TrainerMetrics,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[KopfRunner]:
    with run_operator(cluster, monkeypatch, trainer_metrics_port=trainer.port) as runner:
        yield runner


def sample(name: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name)
    return value or 0.0


def operator_requests(cluster: Cluster) -> list[Any]:
    return cluster.requests(cluster.operator().user)


def grace_periods(cluster: Cluster, infix: str) -> list[int | None]:
    """The grace period each deleted pod whose name holds `infix` was given."""
    return [g for name, g in cluster.kubelet.deletions.items() if infix in name]


# --- pure helpers of the shell ----------------------------------------------------------------
def test_merge_diff_is_a_json_merge_patch() -> None:
    old = {"phase": "Training", "step": 3, "conditions": [{"type": "A"}], "x": {"a": 1, "b": 2}}
    new = {"phase": "Training", "step": 4, "conditions": [{"type": "B"}], "x": {"a": 1}}
    patch = worker.merge_diff(old, new)
    assert patch == {"step": 4, "conditions": [{"type": "B"}], "x": {"b": None}}
    assert worker.merge_diff(new, new) == {}


def test_failure_time_prefers_the_containers_finish() -> None:
    pod = {"status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {
        "terminated": {"finishedAt": "2026-01-01T00:00:10Z"}}}], "conditions": [
        {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:12Z"}]}}
    assert worker.failure_time(pod) == 1767225610.0
    evicted = {"status": {"phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "lastTransitionTime":
         "2026-01-01T00:00:05Z"}]}}
    assert worker.failure_time(evicted) == 1767225605.0
    assert worker.failure_time({"status": {"phase": "Running"}}) is None


# --- scenarios --------------------------------------------------------------------------------
def test_happy_path_70b_compile_train_succeed(
    cluster: Cluster, operator: KopfRunner, trainer: TrainerMetrics, tmp_path: Path
) -> None:
    nodes = cluster.add_nodes(16)
    created_before = sample("llamajob_pods_created_total")
    doc = example("llama3-70b.yaml")
    assert "created" in apply(cluster, doc, tmp_path)
    job = cluster.client.get("llamatrainingjobs", JOB)

    compile_pods = gang(cluster, "compile", 1, 16)
    assert status(cluster)["phase"] == "Compiling"
    assert cluster.client.find("services", JOB) is not None
    config = cluster.client.get("configmaps", config_volume(compile_pods[0]))
    assert "llama3-70b" in config["data"]["config.yaml"]
    for rank, pod in enumerate(compile_pods):
        spec = pod["spec"]
        container = spec["containers"][0]
        assert pod["metadata"]["name"] == f"{JOB}-compile-a1-{rank}"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]
        assert resources["limits"]["aws.amazon.com/neuron"] == "16"  # a quantity
        assert resources["limits"]["vpc.amazonaws.com/efa"] == "8"
        cmd = container["command"]
        # neuron_parallel_compile runs inside the compile marker's wrapper (render.command).
        assert cmd[:3] == ["python", "-m", "llamajob_trainer.compile"]
        cmd = cmd[cmd.index("--") + 1 :]
        assert cmd[:2] == ["neuron_parallel_compile", "torchrun"]
        assert cmd[cmd.index("--nnodes") + 1] == "16"
        assert cmd[cmd.index("--nproc_per_node") + 1] == "32"
        assert cmd[cmd.index("--node_rank") + 1] == str(rank)
        assert cmd[cmd.index("--master_addr") + 1].startswith(f"{JOB}-compile-a1-0.{JOB}.")
        env = env_of(pod)
        assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
        assert "--cache_dir=/fsx/neuron-cache" in env["NEURON_CC_FLAGS"]
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
        assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "ml.trn1.32xlarge",
                                        HEALTH_LABEL: "Schedulable"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["fsx"]["persistentVolumeClaim"]["claimName"] == "fsx-claim"
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes.values())
        assert spec["restartPolicy"] == "Never"

    # The scheduler puts the gang on the 16 nodes, one pod each (required anti-affinity).
    assert sorted(run_all(cluster, compile_pods)) == sorted(nodes)
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="compile gang running")
    finish_all(cluster, compile_pods, 0, {"compileCached": False, "compileKey": "k70b"})
    train_pods = gang(cluster, "train", 1, 16)
    st = wait_phase(cluster, "Training")
    assert condition(st, "Compiled")["reason"] == "CompileFinished"
    assert st["compileKey"] == "k70b"
    for rank, pod in enumerate(train_pods):
        cmd = pod["spec"]["containers"][0]["command"]
        assert cmd[0] == "torchrun" and cmd[cmd.index("--node_rank") + 1] == str(rank)
        assert cmd[cmd.index("train") - 1] == "llamajob.cli"

    trainer.set(step=10, loss=2.5, tokens_per_second=33000.0, mfu=0.31, max_steps=1000)
    assert sorted(run_all(cluster, train_pods)) == sorted(nodes)
    st = wait_for(lambda: (s := status(cluster)).get("step") == 10 and s, what="step 10")
    assert st["loss"] == 2.5 and st["tokensPerSecond"] == 33000.0 and st["mfu"] == 0.31
    table = cluster.kubectl("get", "ltj")
    header, row = table.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "PHASE", "STEP", "LOSS", "TOKENS/S"]
    assert "RESTARTS" in header
    assert row.split()[:6] == [JOB, "Training", "10", "2.5", "33000", "0"]
    header, row = cluster.kubectl("get", "ltj", "-o", "wide").splitlines()[:2]
    assert header.split()[7:12] == ["NODES", "ATTEMPT", "MFU", "VAL-LOSS", "MESSAGE"]
    assert row.split()[7:10] == ["16", "1", "0.31"]

    trainer.set(step=20, loss=2.25, last_checkpoint_step=20)
    st = wait_for(lambda: (s := status(cluster)).get("lastCheckpointStep") == 20 and s,
                  what="checkpoint 20")
    assert st["step"] == 20 and st["etaSeconds"] > 0
    finish_all(cluster, train_pods, 0)
    st = wait_phase(cluster, "Succeeded")
    assert st["restarts"] == 0 and st["completionTime"]
    assert condition(st, "Succeeded")["status"] == "True"
    got = reasons(cluster)
    for reason in ("Validated", "CompileStarted", "CompileFinished", "TrainingStarted",
                   "CheckpointSaved", "Succeeded"):
        assert reason in got
    assert sample("llamajob_pods_created_total") - created_before == 32
    everything = json.dumps([status(cluster), events(cluster)])
    assert "hf-token" not in everything  # secrets are referenced by pods only
    # Compile pods went when training started; finished training pods stay for their logs.
    assert [p["metadata"]["name"] for p in pods(cluster)] == [
        f"{JOB}-train-a1-{r}" for r in range(16)
    ]
    assert_permitted(operator_requests(cluster), scope="cluster")


def test_compile_skipped_on_cached_marker(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    cluster.add_nodes(1)
    apply(cluster, example("llama3-8b.yaml"), tmp_path)
    compile_pods = gang(cluster, "compile", 1, 1)
    run_all(cluster, compile_pods)
    finish_all(cluster, compile_pods, 0, {"compileCached": True, "compileKey": "cached-key"})
    gang(cluster, "train", 1, 1)
    st = wait_phase(cluster, "Training")
    compiled = condition(st, "Compiled")
    assert (compiled["status"], compiled["reason"]) == ("True", "CompileSkipped")
    assert st["compileKey"] == "cached-key"
    assert "CompileSkipped" in reasons(cluster)
    assert "CompileFinished" not in reasons(cluster)


def test_worker_on_unhealthy_node_gang_restart_avoids_node(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    cluster.add_nodes(5)
    apply(cluster, example("llama3-8b.yaml", nodes=4, maxRestarts=3), tmp_path)
    first = gang(cluster, "compile", 1, 4)
    run_all(cluster, first)
    finish_all(cluster, first, 0, {"compileCached": False})
    train = gang(cluster, "train", 1, 4)
    placed = run_all(cluster, train)
    bad = placed[2]
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="training gang running")
    restarts_before = metrics.REGISTRY.get_sample_value(
        "llamajob_job_restarts_total", {"job": JOB, "namespace": cluster.namespace}) or 0.0
    latency_before = sample("llamajob_restart_latency_seconds_count")

    # HyperPod's health agent marks rank 2's node for replacement; its worker dies with it.
    cluster.client.patch("nodes", bad, {"metadata": {"labels": {
        HEALTH_LABEL: "UnschedulablePendingReplacement"}}})
    cluster.kubelet.finish(train[2]["metadata"]["name"], 137, reason="Error")

    second = gang(cluster, "train", 2, 4)
    st = wait_phase(cluster, "Training")
    assert st["attempt"] == 2 and st["restarts"] == 1
    assert bad in st["faultyNodes"]
    assert st["faults"][-1]["node"] == bad
    for pod in second:
        assert avoided_nodes(pod) == [bad]
    wait_for(lambda: not pods(cluster, attempt=1, role="train"), what="old gang deleted")
    # The old gang goes with a short grace period: the new gang waits for it, and survivors
    # of a fault cannot save anyway. (The failed pod is gone at once: it had stopped.)
    assert sorted(grace_periods(cluster, "-train-a1-")) == [30, 30, 30]
    # The scheduler keeps the new gang off the node: it is no longer Schedulable.
    assert bad not in run_all(cluster, second) and len(set(run_all(cluster, second))) == 4
    got = reasons(cluster)
    assert "NodeFault" in got and "Restarting" in got
    assert (metrics.REGISTRY.get_sample_value(
        "llamajob_job_restarts_total", {"job": JOB, "namespace": cluster.namespace}) or 0) == \
        restarts_before + 1
    assert sample("llamajob_restart_latency_seconds_count") == latency_before + 1
    assert_permitted(operator_requests(cluster), scope="cluster")


def test_lost_node_restarts_the_gang_elsewhere(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    _, train = start_training(cluster, tmp_path, nodes=2, spare_nodes=1)
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="gang running")
    lost = node_of(cluster, train[1])
    cluster.kubectl("delete", "node", lost)  # the instance is gone, its pods with it
    second = gang(cluster, "train", 2, 2)
    st = status(cluster)
    assert st["faults"][-1]["reason"] == "NodeGone" and st["faultyNodes"] == [lost]
    assert avoided_nodes(second[0]) == [lost]
    assert lost not in run_all(cluster, second)


def test_plain_crash_restarts_without_blaming_the_node(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    _, train = start_training(cluster, tmp_path, nodes=2)
    detection_before = sample("llamajob_fault_detection_seconds_count")
    detection_sum = sample("llamajob_fault_detection_seconds_sum")
    cluster.kubelet.finish(train[1]["metadata"]["name"], 1,
                           message={"reason": "RuntimeError", "message": "NaN loss"})
    second = gang(cluster, "train", 2, 2)
    st = wait_phase(cluster, "Training")
    assert st["restarts"] == 1 and st["faultyNodes"] == []
    assert "NaN loss" in st["faults"][-1]["message"]
    assert "nodeAffinity" not in second[0]["spec"]["affinity"]
    # Detection is measured from the container's finishedAt (whole seconds) to the decision.
    assert sample("llamajob_fault_detection_seconds_count") == detection_before + 1
    assert 0 <= sample("llamajob_fault_detection_seconds_sum") - detection_sum < 2.5


def test_spec_edit_by_kubectl_apply_restarts_the_gang_with_the_new_config(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    _, first = start_training(cluster, tmp_path, nodes=2)
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="gang running")
    old_config = config_volume(first[0])

    doc = example("llama3-8b.yaml", nodes=2)
    doc["spec"]["compile"]["enabled"] = False
    doc["spec"]["maxSteps"] = 4321
    apply(cluster, doc, tmp_path)  # the same file, edited, applied again

    second = gang(cluster, "train", 2, 2)
    st = wait_phase(cluster, "Training")
    assert (st["attempt"], st["restarts"], st["maxSteps"]) == (2, 0, 4321)
    assert not st.get("faults") and st["observedGeneration"] == 2
    assert "SpecChanged" in reasons(cluster)
    # The old gang was stopped with its own grace period, so its trainer could save.
    own = first[0]["spec"]["terminationGracePeriodSeconds"]
    wait_for(lambda: len(grace_periods(cluster, "-train-a1-")) == 2, what="old gang deleted")
    assert grace_periods(cluster, "-train-a1-") == [own, own] and own > 30
    # The new gang reads the new revision's config; the old revision's stays until the job goes.
    new_config = config_volume(second[0])
    assert new_config != old_config
    assert second[0]["metadata"]["labels"]["llamajob.dev/revision"] == st["revision"]
    text = cluster.client.get("configmaps", new_config)["data"]["config.yaml"]
    assert yaml.safe_load(text)["maxSteps"] == 4321
    assert cluster.client.get("configmaps", old_config)["metadata"]["ownerReferences"]


def test_suspend_by_kubectl_patch_stops_the_gang_and_resume_starts_the_next_attempt(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    _, first = start_training(cluster, tmp_path, nodes=2)
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="gang running")
    revision = status(cluster)["revision"]

    cluster.kubectl("patch", "ltj", JOB, "--type", "merge", "-p", '{"spec":{"suspend":true}}')
    st = wait_phase(cluster, "Suspended")
    assert (st["attempt"], st["restarts"], st["revision"]) == (1, 0, revision)
    assert condition(st, "Suspended")["status"] == "True"
    wait_for(lambda: not pods(cluster), what="suspended pods gone")
    # Stopped with their own grace period, so the trainer could save its step.
    own = first[0]["spec"]["terminationGracePeriodSeconds"]
    assert sorted(cluster.kubelet.deletions) == sorted(p["metadata"]["name"] for p in first)
    assert list(cluster.kubelet.deletions.values()) == [own, own]
    row = cluster.kubectl("get", "ltj").splitlines()[1].split()
    assert row[:2] == [JOB, "Suspended"]

    cluster.kubectl("patch", "ltj", JOB, "--type", "merge", "-p", '{"spec":{"suspend":false}}')
    second = gang(cluster, "train", 2, 2)
    st = wait_phase(cluster, "Training")
    assert (st["attempt"], st["restarts"], st["revision"]) == (2, 0, revision)
    assert not st.get("faults")
    assert condition(st, "Suspended")["reason"] == "Resumed"
    got = reasons(cluster)
    assert got.index("Suspended") < got.index("Resumed")
    run_all(cluster, second)
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="resumed gang running")


def test_model_edit_against_saved_checkpoints_fails_before_any_pod_and_revert_resumes(
    cluster: Cluster, operator: KopfRunner, trainer: TrainerMetrics, tmp_path: Path
) -> None:
    trainer.set(step=60, loss=3.0, last_checkpoint_step=50)
    start_training(cluster, tmp_path, nodes=2)
    st = wait_for(lambda: (s := status(cluster)).get("checkpointFingerprint") and s,
                  what="checkpoint recorded")
    assert (st["lastCheckpointStep"], st["checkpointDir"]) == (50, "/fsx/checkpoints/llama3-8b")

    doc = example("llama3-8b.yaml", nodes=2)
    doc["spec"]["compile"]["enabled"] = False
    doc["spec"]["model"]["numLayers"] = 24
    apply(cluster, doc, tmp_path)
    st = wait_phase(cluster, "Failed")
    assert condition(st, "Failed")["reason"] == "InvalidSpec"
    assert st["message"].startswith("spec.model: this job's checkpoints in /fsx/checkpoints/")
    wait_for(lambda: pods(cluster, attempt=1) == [], what="old gang gone")
    assert pods(cluster) == []  # nothing started for the new model

    del doc["spec"]["model"]["numLayers"]
    apply(cluster, doc, tmp_path)
    gang(cluster, "train", 2, 2)
    st = wait_phase(cluster, "Training")
    assert st["checkpointFingerprint"] and st["lastCheckpointStep"] == 50


def config_volume(pod: dict[str, Any]) -> str:
    return next(v["configMap"]["name"] for v in pod["spec"]["volumes"] if "configMap" in v)


def test_gang_that_cannot_be_scheduled_says_why_until_capacity_arrives(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    cluster.add_nodes(1)
    doc = example("llama3-8b.yaml", nodes=2)
    doc["spec"]["compile"]["enabled"] = False
    apply(cluster, doc, tmp_path)
    train = gang(cluster, "train", 1, 2)

    def scheduled(pod: dict[str, Any]) -> dict[str, Any]:
        fresh = cluster.client.get("pods", pod["metadata"]["name"])
        return condition(fresh.get("status") or {}, "PodScheduled")

    # One node for two pods that may not share one: the scheduler binds one and says why
    # it cannot place the other.
    waiting = wait_for(lambda: [p for p in train if scheduled(p).get("reason") ==
                                "Unschedulable"], what="the scheduler to give up on a pod")
    (placed,) = [p for p in train if p not in waiting]
    cluster.kubelet.run(placed["metadata"]["name"])
    why = scheduled(waiting[0])["message"]
    # The first pod holds the node's Neuron devices and EFA interfaces.
    assert why.startswith("0/1 nodes are available: 1 Insufficient aws.amazon.com/neuron")
    running = wait_for(
        lambda: (c := condition(status(cluster), "Running")).get("reason") == "PodsUnschedulable"
        and c, what="Running condition PodsUnschedulable")
    assert why in running["message"] and why in status(cluster)["message"]
    wait_for(lambda: "Unschedulable" in reasons(cluster), what="Unschedulable event")
    # The user adds a node; the scheduler places the pod there.
    added = cluster.add_nodes(1, prefix="added")
    assert cluster.kubelet.run(waiting[0]["metadata"]["name"]) == added[0]
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="gang running")
    assert "cannot be scheduled" not in status(cluster)["message"]
    assert reasons(cluster).count("Unschedulable") == 1


def test_pod_that_cannot_start_says_why_until_the_secret_exists(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    cluster.add_nodes(2)
    doc = example("llama3-8b.yaml", nodes=2)
    doc["spec"]["compile"]["enabled"] = False
    apply(cluster, doc, tmp_path)
    train = gang(cluster, "train", 1, 2)
    cluster.kubelet.run(train[0]["metadata"]["name"])
    missing = 'secret "hf-token" not found'
    cluster.kubelet.cannot_start(train[1]["metadata"]["name"], "CreateContainerConfigError",
                                 missing)
    running = wait_for(
        lambda: (c := condition(status(cluster), "Running")).get("reason") == "PodsNotStarting"
        and c, what="Running condition PodsNotStarting")
    assert missing in running["message"] and missing in status(cluster)["message"]
    wait_for(lambda: "PodsNotStarting" in reasons(cluster), what="PodsNotStarting event")
    # The user creates the Secret; the kubelet starts the container.
    cluster.kubelet.run(train[1]["metadata"]["name"])
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="gang running")
    st = status(cluster)
    assert "cannot start" not in st["message"] and st["restarts"] == 0 and not st.get("faults")
    assert reasons(cluster).count("PodsNotStarting") == 1


def test_permanent_error_fails_without_restart(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    _, train = start_training(cluster, tmp_path, nodes=2)
    cluster.kubelet.finish(train[0]["metadata"]["name"], 78, message={
        "reason": "ConfigError", "permanent": True, "message": "tokenizer not found"})
    st = wait_phase(cluster, "Failed")
    assert condition(st, "Failed")["reason"] == "TrainerError"
    assert st["restarts"] == 0 and "tokenizer not found" in st["message"]
    time.sleep(0.5)  # give a wrong restart the chance to show up
    assert pods(cluster, attempt=2) == []
    assert "Failed" in reasons(cluster)
    # The still-running rank is stopped; the failed one stays for its logs.
    wait_for(lambda: [p["metadata"]["name"] for p in pods(cluster)] ==
             [train[0]["metadata"]["name"]], what="running pods stopped")


def test_max_restarts_exhausted(cluster: Cluster, operator: KopfRunner, tmp_path: Path) -> None:
    cluster.add_nodes(1)
    doc = example("llama3-8b.yaml", maxRestarts=1)
    doc["spec"]["compile"]["enabled"] = False
    apply(cluster, doc, tmp_path)
    for attempt in (1, 2):
        (pod,) = gang(cluster, "train", attempt, 1)
        run_all(cluster, [pod])
        cluster.kubelet.finish(pod["metadata"]["name"], 137, reason="OOMKilled")
    st = wait_phase(cluster, "Failed")
    assert condition(st, "Failed")["reason"] == "BackoffLimitExceeded"
    assert st["restarts"] == 1 and st["attempt"] == 2
    time.sleep(0.5)
    assert pods(cluster, attempt=3) == []


def test_hang_detected_from_metrics_restarts_gang(
    cluster: Cluster, operator: KopfRunner, trainer: TrainerMetrics, tmp_path: Path
) -> None:
    trainer.set(step=5, loss=3.0)
    start_training(cluster, tmp_path, hangTimeoutSeconds=2)
    wait_for(lambda: status(cluster).get("step") == 5, what="step 5")
    scrapes = trainer.requests
    # The step stops moving: after hangTimeoutSeconds the gang is restarted.
    (second,) = gang(cluster, "train", 2, 1)
    st = status(cluster)
    assert st["restarts"] == 1
    assert st["faults"][-1]["reason"] == "Hang"
    assert trainer.requests > scrapes, "the timer kept reading rank 0 while the step was stuck"
    assert "Hang" in reasons(cluster)
    assert second["metadata"]["name"] == f"{JOB}-train-a2-0"


@pytest.mark.parametrize(
    ("mutate", "field", "admitted"),
    [
        # The models' own cross-field check (minLr <= lr): a CEL rule of the current CRD.
        (lambda d: d["spec"]["optimizer"].update(lr=0.0001, minLr=0.01), "spec.optimizer",
         False),
        # An impossible layout: a CEL rule too, and the planner's.
        (lambda d: d["spec"]["parallelism"].update(tensor=7), "spec.parallelism", False),
        # A layout that does not fit in memory: only the planner knows, so the API server
        # admits it and the operator must refuse it.
        (lambda d: d["spec"]["parallelism"].update(tensor=8, kvReplicator=1),
         "spec.parallelism: needs 19.5 GiB per core", True),
    ],
    ids=["model-validation", "planner-layout", "memory"],
)
def test_invalid_spec_fails_with_event_and_no_pods(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path, mutate: Any, field: str,
    admitted: bool
) -> None:
    """What the current CRD's CEL rules refuse at `kubectl apply` a cluster with an older CRD
    (Helm never upgrades CRDs) admits; what CEL cannot check (memory) any CRD admits. Either
    way the operator fails the job itself: InvalidSpec, an Event, no pod."""
    doc = example("llama3-8b.yaml")
    mutate(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with contextlib.ExitStack() as stack:
        if not admitted:
            out = cluster.kubectl("apply", "-f", str(path), check=False)
            assert "is invalid" in out and field in out, out
            stack.enter_context(older_crd(cluster.k8s))
        apply(cluster, doc, tmp_path)
        st = wait_phase(cluster, "Failed")
        failed = condition(st, "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert field in st["message"]
        assert condition(st, "Validated")["status"] == "False"
        warning = wait_for(lambda: [e for e in events(cluster) if e["type"] == "Warning"],
                           what="a Warning event")
        assert "InvalidSpec" in warning[0]["message"]
        time.sleep(0.5)
        assert pods(cluster) == []


def test_operator_restart_mid_run_converges_without_duplicates(
    cluster: Cluster, trainer: TrainerMetrics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.add_nodes(4)
    created_before = sample("llamajob_pods_created_total")
    config = {"trainer_metrics_port": trainer.port}
    with run_operator(cluster, monkeypatch, **config):
        apply(cluster, example("llama3-8b.yaml", nodes=4), tmp_path)
        compile_pods = gang(cluster, "compile", 1, 4)
        run_all(cluster, compile_pods)
    # While no operator runs, the compile step finishes.
    finish_all(cluster, compile_pods, 0, {"compileCached": False})
    with run_operator(cluster, monkeypatch, **config):
        train = gang(cluster, "train", 1, 4)
        run_all(cluster, train)
        wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
                 what="training running")
    # Down again: a worker dies meanwhile; the next operator restarts the gang exactly once.
    cluster.kubelet.finish(train[3]["metadata"]["name"], 1)
    with run_operator(cluster, monkeypatch, **config):
        gang(cluster, "train", 2, 4)
        st = wait_phase(cluster, "Training")
        assert st["restarts"] == 1 and st["attempt"] == 2
        wait_for(lambda: len(pods(cluster)) == 4, what="old pods cleaned up")
        time.sleep(0.5)  # room for a wrong extra create or restart to show
    st = status(cluster)
    assert st["restarts"] == 1 and st["attempt"] == 2
    assert [p["metadata"]["name"] for p in pods(cluster)] == [
        f"{JOB}-train-a2-{r}" for r in range(4)
    ]
    # Three operator processes, one compile gang and two training gangs: 12 pods created,
    # none of them twice (a duplicate POST would have been answered 409 and not counted).
    assert sample("llamajob_pods_created_total") - created_before == 12
    assert len([e for e in events(cluster) if e["reason"] == "Restarting"]) == 1


def test_deleting_the_job_removes_its_children(
    cluster: Cluster, operator: KopfRunner, tmp_path: Path
) -> None:
    cluster.add_nodes(1)
    apply(cluster, example("llama3-8b.yaml"), tmp_path)
    config = config_volume(gang(cluster, "compile", 1, 1)[0])
    assert cluster.client.find("configmaps", config) is not None
    cluster.kubectl("delete", "ltj", JOB)
    # The garbage collector removes the children through their ownerReferences.
    wait_for(lambda: pods(cluster) == [] and cluster.client.find("services", JOB) is None
             and cluster.client.find("configmaps", config) is None, what="children collected")
    time.sleep(0.5)
    assert cluster.client.find("services", JOB) is None, "no worker recreated children"
    assert cluster.kubectl("get", "ltj", check=False).strip().startswith("No resources")


def test_namespaced_operator_only_uses_role_permissions(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart in `namespace` scope: a Role in the watched namespace and a small ClusterRole;
    the operator, with that token, works its namespace and never touches another."""
    team, other = cluster.namespace, f"{cluster.namespace}-other"
    cluster.k8s.create_namespace(other)
    identity = operator_identity(cluster.k8s, f"ops-{team}", {"operator": {"watch": {
        "scope": "namespace", "namespaces": [team]}}}, namespace=team)
    client = cluster.client
    cluster.add_nodes(1)
    try:
        with run_operator(cluster, monkeypatch, "--namespace", team, identity=identity):
            for ns in (team, other):
                doc = example("llama3-8b.yaml")
                doc["metadata"]["namespace"] = ns
                doc["spec"]["compile"]["enabled"] = False
                client.create("llamatrainingjobs", doc, ns)
            (pod,) = wait_for(lambda: client.list("pods", team), what="a pod in the team's")
            cluster.kubelet.run(pod["metadata"]["name"])
            cluster.kubelet.finish(pod["metadata"]["name"], 0)
            wait_phase(cluster, "Succeeded")
            time.sleep(0.3)
            assert client.list("pods", other) == [], "a job outside --namespace is ignored"
            assert "status" not in client.get("llamatrainingjobs", JOB, other)
        assert_permitted(cluster.requests(identity.user), scope="namespace",
                         namespaces={team})
    finally:
        client.delete("llamatrainingjobs", JOB, other)
        client.delete("namespaces", other)


def test_idle_job_makes_no_api_requests(
    cluster: Cluster, operator: KopfRunner, trainer: TrainerMetrics, tmp_path: Path
) -> None:
    trainer.set(step=7, loss=2.0)
    start_training(cluster, tmp_path, hangTimeoutSeconds=0)
    wait_for(lambda: status(cluster).get("step") == 7, what="step 7")
    time.sleep(0.5)
    quiet_since = time.time()
    scrapes = trainer.requests
    time.sleep(2.0)  # several progress intervals of 0.3 s
    assert trainer.requests >= scrapes + 3, "the progress timer keeps reading rank 0"
    user = cluster.operator().user
    assert cluster.k8s.audit(user=user, since=quiet_since) == [], \
        "nothing changed, so nothing was asked or written"


def test_full_lifecycle_as_the_charts_service_account_is_never_refused(
    cluster: Cluster, operator: KopfRunner, trainer: TrainerMetrics, tmp_path: Path
) -> None:
    """Compile, train, a fault and its restart, suspend, resume, delete: every request the
    operator makes with the chart's ServiceAccount token is one the chart's ClusterRole allows
    (the API server's own verdicts, from its audit log)."""
    cluster.add_nodes(3)
    apply(cluster, example("llama3-8b.yaml", nodes=2), tmp_path)
    compile_pods = gang(cluster, "compile", 1, 2)
    run_all(cluster, compile_pods)
    finish_all(cluster, compile_pods, 0, {"compileCached": False, "compileKey": "k"})
    train = gang(cluster, "train", 1, 2)
    trainer.set(step=4, loss=3.0, last_checkpoint_step=4)
    run_all(cluster, train)
    wait_for(lambda: status(cluster).get("lastCheckpointStep") == 4, what="checkpoint 4")
    cluster.kubelet.finish(train[0]["metadata"]["name"], 137, reason="Error")
    second = gang(cluster, "train", 2, 2)
    run_all(cluster, second)
    wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
             what="the second gang running")
    cluster.kubectl("patch", "ltj", JOB, "--type", "merge", "-p", '{"spec":{"suspend":true}}')
    wait_phase(cluster, "Suspended")
    wait_for(lambda: not pods(cluster), what="suspended pods gone")
    cluster.kubectl("patch", "ltj", JOB, "--type", "merge", "-p", '{"spec":{"suspend":false}}')
    run_all(cluster, gang(cluster, "train", 3, 2))
    wait_phase(cluster, "Training")
    cluster.kubectl("delete", "ltj", JOB)
    wait_for(lambda: not pods(cluster), what="pods collected with the job")
    time.sleep(0.5)  # the operator notices the deletion and stops the job's worker
    records = operator_requests(cluster)
    assert_permitted(records, scope="cluster")
    verbs = {(r.verb, r.resource, r.subresource) for r in records}
    for used in [("create", "pods", None), ("delete", "pods", None),
                 ("create", "configmaps", None), ("create", "services", None),
                 ("create", "events", None), ("patch", "llamatrainingjobs", "status"),
                 ("watch", "llamatrainingjobs", None), ("watch", "nodes", None)]:
        assert used in verbs, f"the lifecycle never used {used}"
