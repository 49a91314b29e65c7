"""What a real API server does to the operator that a quiet test run never shows: a status
write refused with 409 Conflict because someone else wrote the job in between, and watches
broken by an API server restart, after which resuming from the old resourceVersion is answered
410 Gone. Both against the real control plane (``kube_cluster``), kopf in this process."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kube_cluster import (
    JOB,
    Cluster,
    TrainerMetrics,
    assert_permitted,
    cluster_fixture,  # noqa: F401  (the `cluster` fixture)
    condition,
    finish_all,
    gang,
    pods,
    run_all,
    start_training,
    status,
    wait_for,
)
from llamajob import metrics
from llamajob import worker as worker_module
from test_operator_http import operator_requests, run_operator, trainer  # noqa: F401


def test_a_status_write_that_conflicts_is_decided_again_from_the_newer_job(
    cluster: Cluster, trainer: TrainerMetrics, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the operator's read of the job and its status write, another client writes the
    status. The write carries the version the decision read, so the API server refuses it
    (409); the operator decides again from the newer object and its write lands."""
    real_decide = worker_module.decide
    armed, interfered = threading.Event(), threading.Event()

    def decide_then_interfere(body: Any, observed: Any, prior: Any, *args: Any) -> Any:
        decision = real_decide(body, observed, prior, *args)
        if armed.is_set() and not interfered.is_set() and decision.status.step == 6:
            interfered.set()  # another writer, while this decision is on its way
            cluster.client.patch("llamatrainingjobs", JOB, {"status": {
                "message": "written by another client"}}, sub="status")
        return decision

    monkeypatch.setattr(worker_module, "decide", decide_then_interfere)
    conflicts_before = metrics.REGISTRY.get_sample_value("llamajob_status_conflicts_total")
    trainer.set(step=5, loss=3.0)
    with run_operator(cluster, monkeypatch, trainer_metrics_port=trainer.port) as runner:
        start_training(cluster, tmp_path, nodes=2)
        wait_for(lambda: status(cluster).get("step") == 5, what="step 5")
        armed.set()
        trainer.set(step=6, loss=2.9)
        wait_for(interfered.is_set, what="the other client's write")
        st = wait_for(lambda: (s := status(cluster)).get("step") == 6 and s, what="step 6")
        assert st["phase"] == "Training" and condition(st, "Running")["status"] == "True"
    writes = [r for r in operator_requests(cluster)
              if r.resource == "llamatrainingjobs" and r.subresource == "status"]
    codes = [r.code for r in writes]
    assert 409 in codes, f"no conflict was provoked: {codes}"
    assert codes[codes.index(409) + 1] == 200, "the next write, decided again, lands"
    assert metrics.REGISTRY.get_sample_value("llamajob_status_conflicts_total") == \
        (conflicts_before or 0.0) + codes.count(409)
    assert "reconcile failed" not in runner.output, "a conflict is not an error"
    assert [p["metadata"]["name"] for p in pods(cluster)] == [f"{JOB}-train-a1-{r}"
                                                              for r in range(2)]


def test_watches_survive_an_api_server_restart_and_410_gone(
    cluster: Cluster, trainer: TrainerMetrics, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API server restarts under a running job. kopf's watches break and resume from
    their last resourceVersion, which the new server's watch cache no longer holds: 410 Gone,
    then a fresh list. A fault after that must still restart the gang, once."""
    trainer.set(step=3, loss=3.0)
    with run_operator(cluster, monkeypatch, "--all-namespaces", "--verbose",
                      trainer_metrics_port=trainer.port) as runner:
        _, train = start_training(cluster, tmp_path, nodes=2)
        wait_for(lambda: condition(status(cluster), "Running").get("status") == "True",
                 what="gang running")
        # Writes elsewhere move etcd's revision past what the watches last saw.
        for i in range(5):
            cluster.client.create("configmaps", {"metadata": {"name": f"unrelated-{i}"}})
        away = cluster.k8s.restart_apiserver()
        print(f"API server away for {away:.1f} s")
        cluster.kubelet.finish(train[1]["metadata"]["name"], 1, message={
            "reason": "RuntimeError", "message": "NCCL timeout"})
        second = gang(cluster, "train", 2, 2)
        run_all(cluster, second)
        st = wait_for(lambda: (s := status(cluster)).get("attempt") == 2
                      and condition(s, "Running").get("status") == "True" and s,
                      what="the second gang running")
        assert st["restarts"] == 1 and "NCCL timeout" in st["faults"][-1]["message"]
        time.sleep(0.5)  # room for a duplicate restart to show
        assert pods(cluster, attempt=3) == [] and status(cluster)["restarts"] == 1
        settled = time.time()
        finish_all(cluster, second, 0)
        wait_for(lambda: status(cluster).get("phase") == "Succeeded", what="Succeeded")
    assert "Restarting the watch-stream" in runner.output, \
        "no watch was told 410 Gone: the restart did not test what it should"
    # While the server was away the worker backed off (2 s, 4 s...) rather than retrying at
    # every progress tick.
    retries = runner.output.count("reconcile failed")
    assert retries <= 3, f"{retries} failed reconciles in a {away:.0f} s outage"
    # Right after the restart the server refused some requests (403) until its RBAC cache
    # had filled, and kopf and the worker retried; once settled, nothing was refused.
    assert_permitted([r for r in operator_requests(cluster) if r.received >= settled],
                     scope="cluster")
