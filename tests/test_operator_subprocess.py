"""`llamajob operator` as a real process against the real control plane, with a kubeconfig
holding the chart's ServiceAccount token.

Covers what only a process shows: the console script and its flags, the metrics and liveness
endpoints, peering, and being killed (SIGKILL, no clean-up) and started again mid-run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from kube_cluster import (
    ROOT,
    Cluster,
    Identity,
    TrainerMetrics,
    cluster_fixture,  # noqa: F401  (the `cluster` fixture)
    operator_identity,
    uses_of,
    wait_for,
)
from llamajob import operator_cli
from test_operator_http import (
    JOB,
    TRAINER_IMAGES,
    apply,
    assert_permitted,
    condition,
    example,
    finish_all,
    gang,
    operator_requests,
    pods,
    run_all,
    start_training,
    status,
    wait_phase,
)

BIN = Path(sys.executable).parent / "llamajob"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`llamajob operator` with `args` after the tests' own flags, or (`chart_args`) with
    exactly the arguments of the chart's Deployment, its two ports moved to free ones (this is
    no pod of its own)."""

    def __init__(self, identity: Identity, log: Path, *args: str,
                 chart_args: Sequence[str] | None = None) -> None:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        if chart_args is None:
            flags = [
                "--verbose", "--progress-interval", "0.3",
                # As the chart passes trainerImage: the examples set no spec.cluster.image.
                *(f"--trainer-image={family}={image}" for family, image in TRAINER_IMAGES.items()),
            ]
        else:
            flags = [a for a in chart_args
                     if not a.startswith(("--metrics-port=", "--liveness-port="))]
        self.argv = [
            str(BIN), "operator",
            "--metrics-port", str(self.metrics_port),
            "--liveness-port", str(self.liveness_port),
            *flags, *args,
        ]
        self.env = dict(os.environ, KUBECONFIG=str(identity.kubeconfig))
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_for(self.healthy, timeout=60, what="the operator's liveness endpoint")
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n"
                                 f"{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2
            ) as resp:
                return resp.status == 200
        except OSError:
            return False

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as resp:
            return resp.read().decode()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


Starter = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(cluster: Cluster, tmp_path: Path) -> Iterator[Starter]:
    started: list[OperatorProcess] = []

    def start(*args: str, identity: Identity | None = None) -> OperatorProcess:
        proc = OperatorProcess(identity or cluster.operator(), tmp_path / "operator.log",
                               *args).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def test_killed_and_restarted_mid_run_converges_without_duplicates(
    cluster: Cluster, start_operator: Starter, tmp_path: Path
) -> None:
    cluster.add_nodes(4)
    with TrainerMetrics(JOB, cluster.namespace) as trainer:
        args = ("--trainer-metrics-port", str(trainer.port))
        first = start_operator(*args)
        apply(cluster, example("llama3-8b.yaml", nodes=4), tmp_path)
        compile_pods = gang(cluster, "compile", 1, 4)
        run_all(cluster, compile_pods)
        finish_all(cluster, compile_pods[:2], 0, {"compileCached": False})
        first.kill()  # SIGKILL: no clean-up, no goodbye

        # The rest of the compile gang finishes while nobody watches.
        finish_all(cluster, compile_pods[2:], 0, {"compileCached": False})
        second = start_operator(*args)
        train = gang(cluster, "train", 1, 4)
        trainer.set(step=3, loss=4.0)
        run_all(cluster, train)
        wait_for(lambda: status(cluster).get("step") == 3, what="progress from rank 0")
        second.kill()
        third = start_operator(*args)
        finish_all(cluster, train, 0)
        st = wait_phase(cluster, "Succeeded")
        text = third.scrape()
        assert f'llamajob_jobs{{namespace="{cluster.namespace}",phase="Succeeded"}} 1.0' in text
    assert st["restarts"] == 0 and st["attempt"] == 1
    assert condition(st, "Compiled")["reason"] == "CompileFinished"
    creates = uses_of(operator_requests(cluster), "create", "pods")
    # Three processes, eight pods, each created exactly once: nothing re-created, and the
    # restarted processes did not even try (their indices were complete before deciding).
    assert len(creates) == 8, [r.uri for r in creates]
    assert [p["metadata"]["name"] for p in pods(cluster)] == [
        f"{JOB}-train-a1-{r}" for r in range(4)
    ]
    assert_permitted(operator_requests(cluster), scope="cluster")


def test_metrics_and_liveness_endpoints(cluster: Cluster, start_operator: Starter,
                                        tmp_path: Path) -> None:
    proc = start_operator()
    start_training(cluster, tmp_path)
    gauge = f'llamajob_jobs{{namespace="{cluster.namespace}",phase="Training"}} 1.0'
    wait_for(lambda: gauge in proc.scrape(), what="the jobs gauge")
    text = proc.scrape()
    for name in ("llamajob_job_restarts_total", "llamajob_reconcile_duration_seconds_bucket",
                 "llamajob_fault_detection_seconds_count", "llamajob_restart_latency_seconds",
                 "llamajob_pods_created_total 1.0", "llamajob_api_errors_total 0.0"):
        assert name in text
    assert proc.stop() == 0, "SIGTERM is a clean shutdown"


def test_namespace_flag_confines_the_operator(cluster: Cluster, start_operator: Starter) -> None:
    """--namespace with the chart's namespace-scope RBAC: a Role in that namespace only."""
    client, team, other = cluster.client, cluster.namespace, f"{cluster.namespace}-other"
    cluster.k8s.create_namespace(other)
    identity = operator_identity(cluster.k8s, f"ops-{team}", {"operator": {"watch": {
        "scope": "namespace", "namespaces": [team]}}}, namespace=team)
    cluster.add_nodes(1)
    try:
        start_operator("--namespace", team, identity=identity)
        for ns in (other, team):
            doc = example("llama3-8b.yaml")
            doc["metadata"]["namespace"] = ns
            client.create("llamatrainingjobs", doc, ns)
        wait_for(lambda: client.list("pods", team), what="a pod in the team's namespace")
        time.sleep(0.5)
        assert client.list("pods", other) == []
        assert "status" not in client.get("llamatrainingjobs", JOB, other)
        assert_permitted(cluster.requests(identity.user), scope="namespace", namespaces={team})
    finally:
        client.delete("llamatrainingjobs", JOB, other)
        client.delete("namespaces", other)


PEERING = {"operator": {"watch": {"scope": "cluster"}, "peering": {"enabled": True}}}


def test_peering_mode(cluster: Cluster, start_operator: Starter) -> None:
    """--peering with the chart's peering CRD and RBAC: the operator keeps its heartbeat in
    the peering object and works the jobs."""
    crd = ROOT / "charts/llamajob/crds/clusterkopfpeerings.kopf.dev.yaml"
    cluster.k8s.kubectl("apply", "-f", str(crd))
    cluster.k8s.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                        "crd/clusterkopfpeerings.kopf.dev")
    peering = f"llamajob-{cluster.namespace}"
    cluster.client.create("clusterkopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
        "metadata": {"name": peering},
    })
    identity = operator_identity(cluster.k8s, "ops-peering", PEERING)
    cluster.add_nodes(1)
    try:
        start_operator("--peering", peering, identity=identity)
        seen = wait_for(
            lambda: (cluster.client.get("clusterkopfpeerings", peering).get("status") or None),
            what="the operator's heartbeat in the peering object")
        assert len(seen) == 1
        cluster.client.create("llamatrainingjobs", example("llama3-8b.yaml"))
        wait_for(lambda: pods(cluster), what="pods created by the peered operator")
        assert_permitted(cluster.requests(identity.user), scope="cluster", peering=True)
    finally:
        cluster.client.delete("clusterkopfpeerings", peering)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--namespace", "a", "--all-namespaces"], "not allowed with argument"),
        (["--peering", "p", "--standalone"], "not allowed with argument"),
        (["--metrics-port", "70000"], "--metrics-port must be a port number"),
        (["--progress-interval", "0"], "--progress-interval must be positive"),
        (["--trainer-image", "gpu=registry.example/t:1"], "unknown trainer family 'gpu'"),
        (["--trainer-image", "a:1", "--trainer-image", "b:1"], "two images for every family"),
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        operator_cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_flags(llamajob_bin: str) -> None:
    out = subprocess.run([llamajob_bin, "operator", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--namespace", "--all-namespaces", "--peering", "--standalone",
                 "--metrics-port", "--liveness-port", "--trainer-image", "--verbose"):
        assert flag in out.stdout


@pytest.mark.parametrize("kubeconfig", ["missing", None],
                         ids=["KUBECONFIG-missing", "no-KUBECONFIG"])
def test_without_credentials_one_line_and_exit_1(tmp_path: Path, kubeconfig: str | None) -> None:
    """Outside a cluster and without a kubeconfig: one line saying so, not kopf's retries and
    tracebacks ending in "Consider installing an API client library"."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
    env["HOME"] = str(home)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(tmp_path / kubeconfig)
    proc = subprocess.run([str(BIN), "operator", "--metrics-port", "0", "--liveness-port", "0"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == operator_cli.EXIT_NO_CREDENTIALS == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llamajob operator: no Kubernetes credentials: not in a cluster")
    if kubeconfig is None:
        assert f"no kubeconfig at {home}/.kube/config (set KUBECONFIG)" in lines[0]
    else:
        assert str(tmp_path / kubeconfig) in lines[0] and "KUBECONFIG" in lines[0]
    assert "Traceback" not in proc.stderr


def test_an_unreadable_kubeconfig_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("apiVersion: v1\nkind: Config\n")  # no context
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(HOME=str(tmp_path), KUBECONFIG=str(config))
    proc = subprocess.run([str(BIN), "operator"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("llamajob operator: ") and "context" in proc.stderr
