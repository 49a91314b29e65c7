"""One bad job never stalls the operator for the others.

kopf runs in-process (``kopf.testing.KopfRunner``) against the real API server, with kopf's
liveness endpoint on; the operator's event loop also serves the watches, every job's worker and
``/healthz``. A job whose numbers are absurd (numHeads 999999937, a billion layers, a hang
timeout of 10**15 s) is created together with a healthy one: the healthy job's pods must appear
within a second, ``/healthz`` must answer all along, and the bad job must end Failed with
InvalidSpec naming the field.

The CRD is installed without its maxima, as an older CRD still in a cluster admits such a job
(Helm installs CRDs but never upgrades them), so the operator itself has to cope with it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from k8s_control_plane import ControlPlane
from kopf.testing import KopfRunner
from kube_cluster import (
    Cluster,
    condition,
    example,
    make_cluster,
    older_crd,
    pods,
    status,
    wait_for,
)
from llamajob import handlers
from llamajob import worker as worker_module
from test_operator_http import TRAINER_IMAGES

# The loop may be busy for a moment with the watches and writes of two jobs; a blocked loop
# (what this guards against) leaves a probe unanswered for the whole decision, seconds to
# minutes.
PROBE_TIMEOUT = 1.0
PODS_WITHIN = 1.0
PRIME = 999_999_937


@pytest.fixture(name="cluster")
def relaxed_cluster(k8s: ControlPlane, crd: dict[str, Any], tmp_path: Path
                    ) -> Iterator[Cluster]:
    """A namespace of the test's own, under a CRD without maxima or CEL rules."""
    cluster = make_cluster(k8s, tmp_path)
    try:
        with older_crd(k8s):
            yield cluster
    finally:
        cluster.clean_up()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_operator(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, healthz: str
                 ) -> Iterator[KopfRunner]:
    monkeypatch.setenv("KUBECONFIG", str(cluster.operator().kubeconfig))
    monkeypatch.setattr(handlers, "CONFIG", handlers.OperatorConfig(
        progress_interval=0.3, trainer_images=TRAINER_IMAGES))
    args = ["run", "--standalone", "--all-namespaces", "--liveness", healthz,
            "-m", "llamajob.handlers"]
    with KopfRunner(args, timeout=120) as runner:
        yield runner
    assert runner.exception is None, runner.output


@dataclass
class Prober:
    """Asks /healthz again and again from a thread of its own, as the kubelet would."""

    url: str
    answers: list[tuple[float, int]] = field(default_factory=list)  # (seconds, HTTP status)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=PROBE_TIMEOUT) as resp:
                    self.answers.append((time.monotonic() - started, resp.status))
            except OSError as exc:
                self.failures.append(f"after {time.monotonic() - started:.2f} s: {exc!r}")
            self._stop.wait(0.05)

    @contextlib.contextmanager
    def running(self) -> Iterator[Prober]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=10)


def tiny_job(name: str) -> dict[str, Any]:
    doc = example("tiny.yaml", job=name)
    doc["spec"]["compile"]["enabled"] = False
    return doc


def pathological_job(name: str) -> dict[str, Any]:
    doc = tiny_job(name)
    doc["spec"]["model"].update(numHeads=PRIME, hiddenSize=PRIME, numKvHeads=3,
                                numLayers=PRIME)
    doc["spec"]["parallelism"]["pipeline"] = 2
    doc["spec"]["restartPolicy"]["hangTimeoutSeconds"] = 10**15
    return doc


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False  # not listening yet


def warm_up(cluster: Cluster, healthz: str) -> None:
    """The operator answers its probe and acts on a job: its watches are up."""
    wait_for(lambda: answers(healthz), timeout=30, what="/healthz")
    cluster.client.create("llamatrainingjobs", tiny_job("warm-up"))
    wait_for(lambda: pods(cluster, "warm-up"), timeout=30, what="the warm-up job's pods")


def created_within(cluster: Cluster, job: str, seconds: float) -> float:
    """Create `job` (tiny, healthy) and return how long until its pods were seen."""
    started = time.monotonic()
    cluster.client.create("llamatrainingjobs", tiny_job(job))
    wait_for(lambda: pods(cluster, job), timeout=seconds, interval=0.02,
             what=f"{job}'s pods within {seconds} s of its creation")
    return time.monotonic() - started


def assert_always_answered(prober: Prober) -> None:
    assert not prober.failures, f"/healthz went unanswered: {prober.failures}"
    assert len(prober.answers) >= 5, prober.answers
    assert all(code == 200 for _, code in prober.answers), prober.answers


def test_pathological_job_fails_by_itself_while_a_healthy_one_starts_at_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthz = f"http://127.0.0.1:{free_port()}/healthz"
    with run_operator(cluster, monkeypatch, healthz):
        warm_up(cluster, healthz)
        with Prober(healthz).running() as prober:
            cluster.client.create("llamatrainingjobs", pathological_job("absurd"))
            created_within(cluster, "healthy", PODS_WITHIN)
            st = wait_for(lambda: (s := status(cluster, "absurd")).get("phase") == "Failed"
                          and s, timeout=30, what="the absurd job Failed")
            time.sleep(0.5)  # the probe goes on a little after the verdict
        assert_always_answered(prober)
        failed = condition(st, "Failed")
        assert failed["reason"] == "InvalidSpec"
        # The planner (or, with maxima in the models, their validation) names numHeads.
        assert "spec.model." in st["message"] and "numHeads" in st["message"], st["message"]
        assert pods(cluster, "absurd") == []
        assert status(cluster, "healthy")["phase"] == "Training"


def test_a_slow_decision_runs_off_the_event_loop(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes a decision slow (a planner path not yet bounded, a huge object), the
    operator's loop goes on: the core is made to compute for 3 s on one job."""
    real = worker_module.reconcile
    burnt = threading.Event()

    def slow(job: Any, observed: Any, now: Any) -> Any:
        if job.metadata.name == "slow" and not burnt.is_set():
            burnt.set()
            end = time.monotonic() + 3.0
            while time.monotonic() < end:  # pure Python, as the planner is
                pass
        return real(job, observed, now)

    monkeypatch.setattr(worker_module, "reconcile", slow)
    healthz = f"http://127.0.0.1:{free_port()}/healthz"
    with run_operator(cluster, monkeypatch, healthz):
        warm_up(cluster, healthz)
        with Prober(healthz).running() as prober:
            cluster.client.create("llamatrainingjobs", tiny_job("slow"))
            wait_for(burnt.is_set, timeout=10, what="the slow decision to start")
            created_within(cluster, "healthy", PODS_WITHIN)
            wait_for(lambda: pods(cluster, "slow"), timeout=30, what="the slow job's pods")
        assert_always_answered(prober)
        assert max(seconds for seconds, _ in prober.answers) < PROBE_TIMEOUT
