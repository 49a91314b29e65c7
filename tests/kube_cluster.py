"""The cluster the operator tests run against: the emulator from ``kube_emulator`` with the CRD
installed, a small synchronous client, a kubelet and scheduler played by the tests (pods never
run), rank 0's metrics endpoint stood in by the trainer's own metrics module, and the scenario
helpers and the ``cluster`` fixture the operator tests share."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_emulator import KUBECTL, ROOT, EmulatorThread, RecordedRequest, now_iso
from llamajob.permissions import grants, triples

# --- a small synchronous client for tests (they play kubelet, admin and user with it) ----------
API_PATHS = {
    "pods": "api/v1", "services": "api/v1", "configmaps": "api/v1", "events": "api/v1",
    "nodes": "api/v1", "namespaces": "api/v1",
    "llamatrainingjobs": "apis/llamajob.dev/v1alpha1",
    "customresourcedefinitions": "apis/apiextensions.k8s.io/v1",
}
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions"}


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Client:
    def __init__(self, base_url: str, *, user_agent: str = "llamajob-tests") -> None:
        self.base_url = base_url.rstrip("/")
        self.user_agent = user_agent

    def path(self, plural: str, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
        parts = [API_PATHS[plural]]
        if namespace and plural not in CLUSTER_SCOPED:
            parts += ["namespaces", namespace]
        parts.append(plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/" + "/".join(parts)

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json",
                params: Mapping[str, str] | None = None) -> Any:
        url = self.base_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("User-Agent", self.user_agent)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text
            raise ApiError(exc.code, payload) from None
        return json.loads(raw) if raw else None

    def get(self, plural: str, name: str, namespace: str = "default") -> dict[str, Any]:
        return self.request("GET", self.path(plural, namespace, name))

    def find(self, plural: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        try:
            return self.get(plural, name, namespace)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, plural: str, namespace: str | None = "default", *,
             labels: str | None = None, fields: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"labelSelector": labels, "fieldSelector": fields}.items() if v}
        return self.request("GET", self.path(plural, namespace), params=params)["items"]

    def create(self, plural: str, obj: dict[str, Any], namespace: str = "default") -> Any:
        return self.request("POST", self.path(plural, namespace), obj)

    def patch(self, plural: str, name: str, patch: Any, namespace: str = "default", *,
              sub: str | None = None) -> Any:
        return self.request("PATCH", self.path(plural, namespace, name, sub), patch,
                            content_type="application/merge-patch+json")

    def delete(self, plural: str, name: str, namespace: str = "default") -> Any:
        return self.request("DELETE", self.path(plural, namespace, name))


# --- the cluster the tests run against ---------------------------------------------------------
HEALTH_LABEL = "sagemaker.amazonaws.com/node-health-status"


def node_manifest(name: str, instance_type: str = "ml.trn1.32xlarge",
                  health: str = "Schedulable") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "node.kubernetes.io/instance-type": instance_type,
                "kubernetes.io/hostname": name,
                HEALTH_LABEL: health,
            },
        },
        "status": {"conditions": [{"type": "Ready", "status": "True",
                                   "lastTransitionTime": now_iso()}]},
    }


class Kubelet:
    """Plays the kubelet (and scheduler): binds pods to nodes and reports how they end."""

    def __init__(self, client: Client, namespace: str = "default") -> None:
        self.client = client
        self.namespace = namespace

    def run(self, pod: str, node: str, ip: str = "127.0.0.1") -> None:
        self.client.patch("pods", pod, {"spec": {"nodeName": node}}, self.namespace)
        self.client.patch("pods", pod, {"status": {
            "phase": "Running",
            "podIP": ip,
            "startTime": now_iso(),
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now_iso()}],
            "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": now_iso()}}}],
        }}, self.namespace, sub="status")

    def unschedulable(self, pod: str, message: str) -> None:
        """The scheduler found no node for the pod."""
        self.client.patch("pods", pod, {"status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": message, "lastTransitionTime": now_iso()}]}}, self.namespace, sub="status")

    def cannot_start(self, pod: str, node: str, reason: str, message: str) -> None:
        """Placed on a node, but the container cannot start (image pull, missing Secret...)."""
        self.client.patch("pods", pod, {"spec": {"nodeName": node}}, self.namespace)
        self.client.patch("pods", pod, {"status": {"phase": "Pending", "containerStatuses": [
            {"name": "trainer", "ready": False, "restartCount": 0,
             "state": {"waiting": {"reason": reason, "message": message}}}]}},
            self.namespace, sub="status")

    def finish(self, pod: str, exit_code: int, *, reason: str | None = None,
               message: Mapping[str, Any] | str | None = None) -> None:
        text = json.dumps(message) if isinstance(message, Mapping) else message
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "finishedAt": now_iso(),
            "startedAt": now_iso(),
        }
        if text is not None:
            terminated["message"] = text
        self.client.patch("pods", pod, {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now_iso()}],
            "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0,
                                   "state": {"terminated": terminated}}],
        }}, self.namespace, sub="status")

    def evict(self, pod: str) -> None:
        self.client.patch("pods", pod, {"status": {
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory.",
            "conditions": [{"type": "DisruptionTarget", "status": "True",
                            "reason": "TerminationByKubelet", "lastTransitionTime": now_iso()}],
        }}, self.namespace, sub="status")


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll until predicate() is truthy; return its value or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def kubectl(kubeconfig: Path, *args: str, check: bool = True, timeout: float = 60) -> str:
    """The real kubectl binary against the emulator."""
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), HOME=str(kubeconfig.parent))
    proc = subprocess.run([str(KUBECTL), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc.stdout + (proc.stderr if not check else "")


def metrics_server(render: Callable[[], bytes]) -> http.server.ThreadingHTTPServer:
    """A Prometheus endpoint on a free local port whose every GET returns `render()`; the
    caller runs `serve_forever` (in a thread) and `shutdown`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = render()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


class TrainerMetrics:
    """Stands in for rank 0's Prometheus endpoint; the pods in these tests have IP 127.0.0.1.

    The exposition is produced by the trainer's own metrics module (same names, same labels),
    so the operator is tested against what the trainer really serves."""

    def __init__(self, job: str, namespace: str = "default") -> None:
        from llamajob_trainer.metrics import build_registry

        self.registry, self.metrics = build_registry(job, namespace)
        self.requests = 0
        self.server = metrics_server(self._render)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _render(self) -> bytes:
        from prometheus_client import generate_latest

        self.requests += 1
        return generate_latest(self.registry)

    def set(self, *, step: int, loss: float, tokens_per_second: float = 1000.0,
            mfu: float = 0.3, last_checkpoint_step: int | None = None,
            max_steps: int | None = None) -> None:
        m = self.metrics
        m.step.set(step)
        m.loss.set(loss)
        m.tokens_per_second.set(tokens_per_second)
        m.mfu.set(mfu)
        if last_checkpoint_step is not None:
            m.last_checkpoint_step.set(last_checkpoint_step)
        if max_steps is not None:
            m.max_steps.set(max_steps)

    def __enter__(self) -> TrainerMetrics:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Cluster:
    """One emulated cluster: the emulator, a client, a kubelet, and a kubeconfig for it."""

    emu: EmulatorThread
    client: Client
    kubelet: Kubelet
    kubeconfig: Path

    def add_nodes(self, count: int, prefix: str = "trn1-node",
                  instance_type: str = "ml.trn1.32xlarge") -> list[str]:
        names = [f"{prefix}-{i}" for i in range(count)]
        for name in names:
            self.client.create("nodes", node_manifest(name, instance_type))
        return names

    def kubectl(self, *args: str, check: bool = True) -> str:
        return kubectl(self.kubeconfig, *args, check=check)


# --- scenario helpers (shared by the operator tests) ----------------------------------------
JOB = "llm"
OPERATOR_AGENTS = ("kopf/", "llamajob-operator/")


# --- helpers ------------------------------------------------------------------------------------
def example(name: str, *, job: str = JOB, nodes: int | None = None,
            **restart: Any) -> dict[str, Any]:
    """An example job with a test-friendly restart policy (no backoff unless asked)."""
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    doc["metadata"] = {"name": job}
    policy = doc["spec"].setdefault("restartPolicy", {})
    policy.update({"backoffSeconds": 0, **restart})
    if nodes is not None:
        doc["spec"]["cluster"]["nodes"] = nodes
    return doc


def apply(cluster: Cluster, doc: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return cluster.kubectl("apply", "-f", str(path))


def start_training(cluster: Cluster, tmp_path: Path, *, spare_nodes: int = 0,
                   **example_args: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Apply the 8B example without its compile step (`example_args` as for `example`); returns
    the nodes added (`nodes` of them plus `spare_nodes`) and the first training gang, running
    on the first nodes."""
    size = example_args.get("nodes") or 1
    nodes = cluster.add_nodes(size + spare_nodes)
    doc = example("llama3-8b.yaml", **example_args)
    doc["spec"]["compile"]["enabled"] = False
    apply(cluster, doc, tmp_path)
    train = gang(cluster, "train", 1, size)
    run_all(cluster, train, nodes[:size])
    return nodes, train


def status(cluster: Cluster, job: str = JOB) -> dict[str, Any]:
    return cluster.client.get("llamatrainingjobs", job).get("status") or {}


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def pods(cluster: Cluster, job: str = JOB, **labels: Any) -> list[dict[str, Any]]:
    selector = ",".join([f"llamajob.dev/job={job}"] + [
        f"llamajob.dev/{k}={v}" for k, v in labels.items()
    ])
    found = cluster.client.list("pods", labels=selector)
    return sorted(found, key=lambda p: int(p["metadata"]["labels"]["llamajob.dev/rank"]))


def gang(cluster: Cluster, role: str, attempt: int, size: int, job: str = JOB) -> list[dict]:
    return wait_for(
        lambda: (found := pods(cluster, job, role=role, attempt=attempt)) and len(found) == size
        and found,
        what=f"{size} {role} pod(s) of attempt {attempt}",
    )


def run_all(cluster: Cluster, members: list[dict[str, Any]], nodes: list[str]) -> None:
    for pod, node in zip(members, nodes, strict=True):
        cluster.kubelet.run(pod["metadata"]["name"], node)


def finish_all(cluster: Cluster, members: list[dict[str, Any]], code: int = 0,
               message: dict[str, Any] | None = None) -> None:
    for pod in members:
        cluster.kubelet.finish(pod["metadata"]["name"], code, message=message)


def wait_phase(cluster: Cluster, phase: str, job: str = JOB, timeout: float = 30) -> dict:
    return wait_for(lambda: (st := status(cluster, job)).get("phase") == phase and st,
                    timeout=timeout, what=f"phase {phase}")


def events(cluster: Cluster, job: str = JOB) -> list[dict[str, Any]]:
    return cluster.client.list("events", fields=f"involvedObject.name={job}")


def reasons(cluster: Cluster, job: str = JOB) -> list[str]:
    return [e["reason"] for e in sorted(events(cluster, job),
                                        key=lambda e: e["metadata"]["resourceVersion"])]


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in pod["spec"]["containers"][0]["env"]}


def operator_requests(cluster: Cluster) -> list[RecordedRequest]:
    return [r for r in cluster.emu.requests() if r.user_agent.startswith(OPERATOR_AGENTS)]


def assert_permitted(requests: list[RecordedRequest], *, scope: str,
                     namespaces: set[str] | None = None, peering: bool = False) -> None:
    """Every request the operator made is allowed by permissions.py, with RBAC's scoping: a
    namespaced request may use the Role and the ClusterRole, a cluster-wide one only the
    ClusterRole."""
    g = grants(scope, peering=peering)  # type: ignore[arg-type]
    cluster_wide, in_namespace = triples(g.cluster), triples(g.cluster) | triples(g.namespaced)
    denied = set()
    for r in requests:
        if r.rbac is None:
            continue  # discovery (/api, /apis, /version) is open to every authenticated user
        ok = in_namespace if r.namespace and (namespaces is None or r.namespace in namespaces) \
            else cluster_wide
        if r.rbac not in ok:
            denied.add((r.rbac, r.namespace or "<cluster>"))
    assert not denied, f"requests not covered by permissions.py: {sorted(denied)}"
    assert any(r.rbac and r.rbac[2] == "create" for r in requests), "no writes recorded at all"



@pytest.fixture(name="cluster")
def cluster_fixture(tmp_path: Path) -> Iterator[Cluster]:
    """An emulated cluster with the CRD installed and the default namespace present."""
    with EmulatorThread() as emu:
        emu.install_crd()
        client = Client(emu.url)
        client.create("namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": {"name": "default"}})
        kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")
        yield Cluster(emu=emu, client=client, kubelet=Kubelet(client), kubeconfig=kubeconfig)
