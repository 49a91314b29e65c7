"""The cluster the operator tests run against: the real control plane of ``k8s_control_plane``
(one per test session, started by the ``k8s`` fixture in conftest.py), a namespace of its own
for each test, the operator's identity as the Helm chart grants it, a small synchronous client,
and the part of a kubelet that the tests play.

What is real: the API server (schema and CEL admission, RBAC, selectors, resourceVersions,
status subresource, graceful deletion), the scheduler (it binds every pod the operator creates
to a Node the test made), the controller-manager (garbage collection, ServiceAccounts,
namespace deletion), kubectl, and the operator's credentials: a ServiceAccount token issued by
the API server for the chart's ServiceAccount, bound to the chart's (Cluster)Roles.

What the tests play (:class:`Kubelet`): no container ever runs. Once the scheduler has bound a
pod, a test writes its status as a kubelet would (Running with an IP, a container that cannot
start, Failed or Succeeded with an exit code and termination message), and a background thread
completes graceful deletions (a kubelet confirms a deleted pod's containers have stopped by
deleting it again with grace 0; here the containers stop at once). Rank 0's metrics endpoint
is played by the trainer's own metrics module on 127.0.0.1, the IP every Running pod reports.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import render_objects
from k8s_control_plane import ADMIN_TOKEN, AuditRecord, ControlPlane
from llamajob.permissions import grants, triples

ROOT = Path(__file__).resolve().parent.parent


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- a small synchronous client for tests (they play kubelet, admin and user with it) ----------
API_PATHS = {
    "pods": "api/v1", "services": "api/v1", "configmaps": "api/v1", "events": "api/v1",
    "nodes": "api/v1", "namespaces": "api/v1", "persistentvolumes": "api/v1",
    "persistentvolumeclaims": "api/v1",
    "llamatrainingjobs": "apis/llamajob.dev/v1alpha1",
    "customresourcedefinitions": "apis/apiextensions.k8s.io/v1",
    "clusterkopfpeerings": "apis/kopf.dev/v1",
}
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "persistentvolumes",
                  "clusterkopfpeerings"}


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Client:
    """Admin requests to the test's API server, raising ApiError on 4xx/5xx; `namespace` is the
    default for namespaced kinds."""

    def __init__(self, k8s: ControlPlane, namespace: str) -> None:
        self.k8s = k8s
        self.namespace = namespace

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
        query = "?" + urllib.parse.urlencode(params) if params else ""
        resp = self.k8s.request(method, path + query, body, content_type=content_type)
        if resp.status >= 400:
            raise ApiError(resp.status, resp.body)
        return resp.body

    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.request("GET", self.path(plural, self._ns(namespace), name))

    def find(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return self.get(plural, name, namespace)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, plural: str, namespace: str | None = None, *,
             labels: str | None = None, fields: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"labelSelector": labels, "fieldSelector": fields}.items() if v}
        return self.request("GET", self.path(plural, self._ns(namespace)), params=params)["items"]

    def create(self, plural: str, obj: dict[str, Any], namespace: str | None = None) -> Any:
        return self.request("POST", self.path(plural, self._ns(namespace)), obj)

    def patch(self, plural: str, name: str, patch: Any, namespace: str | None = None, *,
              sub: str | None = None) -> Any:
        return self.request("PATCH", self.path(plural, self._ns(namespace), name, sub), patch,
                            content_type="application/merge-patch+json")

    def delete(self, plural: str, name: str, namespace: str | None = None, *,
               grace_seconds: int | None = None) -> Any:
        body = None if grace_seconds is None else {"gracePeriodSeconds": grace_seconds}
        return self.request("DELETE", self.path(plural, self._ns(namespace), name), body)


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


# --- the kubelet's part -------------------------------------------------------------------------
class Kubelet:
    """Moves the pods of one namespace through their status, as their kubelets would.

    The scheduler binds pods; :meth:`run` and friends wait for that and then write status.
    A thread completes graceful deletions and records the grace period each one was given."""

    def __init__(self, client: Client, namespace: str, poll: float = 0.05) -> None:
        self.client = client
        self.namespace = namespace
        self.poll = poll
        self.deletions: dict[str, int | None] = {}  # pod -> deletionGracePeriodSeconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._finish_deletions, daemon=True,
                                        name=f"kubelet-{namespace}")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _finish_deletions(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                pods = self.client.list("pods", self.namespace)
            except (ApiError, OSError):
                continue  # the namespace is going, or the server is stopping
            for pod in pods:
                meta = pod["metadata"]
                if not meta.get("deletionTimestamp"):
                    continue
                self.deletions.setdefault(meta["name"], meta.get("deletionGracePeriodSeconds"))
                try:
                    self.client.delete("pods", meta["name"], self.namespace, grace_seconds=0)
                except ApiError as exc:
                    if exc.status != 404:
                        raise

    def bound(self, pod: str, timeout: float = 30) -> str:
        """The node the scheduler bound `pod` to (waiting for it)."""
        found: str = wait_for(
            lambda: self.client.get("pods", pod, self.namespace)["spec"].get("nodeName"),
            timeout=timeout, what=f"the scheduler to bind {pod}")
        return found

    def _status(self, pod: str, status: Mapping[str, Any]) -> None:
        self.client.patch("pods", pod, {"status": status}, self.namespace, sub="status")

    def run(self, pod: str, ip: str = "127.0.0.1") -> str:
        """Once bound, the container runs; returns the node."""
        node = self.bound(pod)
        self._status(pod, {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": ip,
            "startTime": now_iso(),
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now_iso()}],
            "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0,
                                   "image": "trainer", "imageID": "",
                                   "state": {"running": {"startedAt": now_iso()}}}],
        })
        return node

    def cannot_start(self, pod: str, reason: str, message: str) -> str:
        """Bound, but the container cannot start (image pull, missing Secret...)."""
        node = self.bound(pod)
        self._status(pod, {"phase": "Pending", "containerStatuses": [
            {"name": "trainer", "ready": False, "restartCount": 0, "image": "trainer",
             "imageID": "", "state": {"waiting": {"reason": reason, "message": message}}}]})
        return node

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
        self._status(pod, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now_iso()}],
            "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0,
                                   "image": "trainer", "imageID": "",
                                   "state": {"terminated": terminated}}],
        })


# --- nodes and storage ----------------------------------------------------------------------
HEALTH_LABEL = "sagemaker.amazonaws.com/node-health-status"
# What the device plugins advertise on each instance type (cores, memory and the device
# resources the rendered pods request); a node that lacks one is not a fit for the pods.
ALLOCATABLE = {
    "ml.trn1.32xlarge": {"cpu": "128", "memory": "512Gi", "aws.amazon.com/neuron": "16",
                         "vpc.amazonaws.com/efa": "8"},
    "ml.trn2.48xlarge": {"cpu": "192", "memory": "2Ti", "aws.amazon.com/neuron": "16",
                         "vpc.amazonaws.com/efa": "16"},
    "ml.p5.48xlarge": {"cpu": "192", "memory": "2Ti", "nvidia.com/gpu": "8",
                       "vpc.amazonaws.com/efa": "32"},
}
TAINT = {"ml.trn1.32xlarge": "aws.amazon.com/neuron", "ml.trn2.48xlarge": "aws.amazon.com/neuron",
         "ml.p5.48xlarge": "nvidia.com/gpu"}
CLAIMS = ("fsx-claim",)  # the shared file system the examples mount


def add_bound_claim(k8s: ControlPlane, namespace: str, claim: str) -> None:
    """A PersistentVolumeClaim bound to a PersistentVolume: pods that mount an unbound claim
    are never scheduled."""
    volume = f"{namespace}-{claim}"
    k8s.ok("POST", "/api/v1/persistentvolumes", {"metadata": {"name": volume}, "spec": {
        "capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteMany"],
        "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
        "nfs": {"server": "fsx.example.invalid", "path": "/"},
        "claimRef": {"namespace": namespace, "name": claim}}})
    k8s.ok("POST", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
        "metadata": {"name": claim}, "spec": {
            "accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
            "resources": {"requests": {"storage": "1Ti"}}}})


# --- the operator's identity, as the chart grants it --------------------------------------------
RELEASE_NAMESPACE = "llamajob-system"
_RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


# (API server, release) -> the identity made for it: the chart's objects are cluster state.
_IDENTITIES: dict[tuple[str, str], Identity] = {}


@dataclass(frozen=True)
class Identity:
    kubeconfig: Path
    user: str


def operator_identity(k8s: ControlPlane, release: str, values: Mapping[str, Any],
                      namespace: str | None = None) -> Identity:
    """Install the chart's ServiceAccount and RBAC for `release` (rendered with `values`) and
    return a kubeconfig holding a token the API server issued for that ServiceAccount, with
    `namespace` as its default. Once per release and session: the objects are cluster state."""
    key = (k8s.server, release)
    if key in _IDENTITIES:
        return _IDENTITIES[key]
    if k8s.request("GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}").status == 404:
        k8s.create_namespace(RELEASE_NAMESPACE)
    objects = [o for o in render_objects(values, namespace=RELEASE_NAMESPACE, release=release)
               if o["kind"] in _RBAC_KINDS]
    k8s.kubectl("apply", "-f", "-", stdin=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": objects}))
    (sa,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    kubeconfig, _ = k8s.kubeconfig_for(RELEASE_NAMESPACE, sa)
    if namespace:
        set_namespace(kubeconfig, namespace)
    identity = Identity(kubeconfig, f"system:serviceaccount:{RELEASE_NAMESPACE}:{sa}")
    # The authorizer reads bindings from an informer cache: wait until it has them.
    wait_for(lambda: k8s.kubectl("auth", "can-i", "list", "nodes", kubeconfig=kubeconfig,
                                 check=False).stdout.strip() == "yes",
             timeout=15, interval=0.2, what=f"{identity.user}'s bindings to take effect")
    _IDENTITIES[key] = identity
    return identity


def set_namespace(kubeconfig: Path, namespace: str) -> Path:
    config = json.loads(kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = namespace
    kubeconfig.write_text(json.dumps(config, indent=1))
    return kubeconfig


CLUSTER_SCOPE = {"operator": {"watch": {"scope": "cluster"}}}


# --- an older CRD -------------------------------------------------------------------------------
CRD_FILE = ROOT / "crds" / "llamatrainingjobs.llamajob.dev.yaml"


def _relaxed(schema: Any) -> Any:
    """The schema without maxima and CEL rules, as a CRD from before they existed."""
    if isinstance(schema, dict):
        return {k: _relaxed(v) for k, v in schema.items()
                if k not in ("maximum", "x-kubernetes-validations")}
    if isinstance(schema, list):
        return [_relaxed(v) for v in schema]
    return schema


@contextlib.contextmanager
def older_crd(k8s: ControlPlane) -> Iterator[None]:
    """Replace the installed CRD by one without maxima or CEL rules for the block: Helm
    installs CRDs but never upgrades them, so a cluster may admit jobs the current CRD
    refuses, and the operator must refuse them itself. The current CRD is back afterwards."""
    current = yaml.safe_load(CRD_FILE.read_text())
    relaxed = _relaxed(current)
    try:
        _replace_crd(k8s, relaxed)
        yield
    finally:
        _replace_crd(k8s, current)


def _replace_crd(k8s: ControlPlane, crd: dict[str, Any]) -> None:
    k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(crd))
    served = crd["spec"]["versions"][0]["schema"]
    name = crd["metadata"]["name"]

    def in_force() -> bool:
        # The API server swaps its handler for the CRD a moment after the update.
        probe = k8s.request("POST", "/apis/llamajob.dev/v1alpha1/namespaces/default/"
                            "llamatrainingjobs?dryRun=All", _PROBE)
        admitted = probe.status == 201
        stored = k8s.ok("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        same = stored["spec"]["versions"][0]["schema"] == served
        return same and admitted == ("x-kubernetes-validations" not in json.dumps(served))

    wait_for(in_force, timeout=30, interval=0.1, what="the replaced CRD to be served")


# A job every CEL rule refuses (tensor 7 does not divide 32 cores), and no schema bound does.
_PROBE = {"apiVersion": "llamajob.dev/v1alpha1", "kind": "LlamaTrainingJob",
          "metadata": {"name": "crd-probe"},
          "spec": {**yaml.safe_load((ROOT / "examples" / "llama3-8b.yaml").read_text())["spec"],
                   "parallelism": {"tensor": 7}}}


# --- the cluster one test sees ------------------------------------------------------------------
_TESTS = itertools.count(1)


@dataclass
class Cluster:
    """One test's view of the control plane: its own namespace and nodes."""

    k8s: ControlPlane
    namespace: str
    client: Client
    kubelet: Kubelet
    kubeconfig: Path  # the admin (a user of the cluster), default namespace = `namespace`
    started: float = field(default_factory=time.time)
    nodes: list[str] = field(default_factory=list)
    claims: tuple[str, ...] = CLAIMS
    # Cluster-scoped objects a test made for this namespace: (plural, name), deleted afterwards.
    cleanups: list[tuple[str, str]] = field(default_factory=list)

    def add_nodes(self, count: int, prefix: str = "node",
                  instance_type: str = "ml.trn1.32xlarge") -> list[str]:
        """Ready Nodes of `instance_type`, HyperPod-labelled Schedulable, tainted for their
        devices, named after the test's namespace so no test schedules onto another's."""
        base = len([n for n in self.nodes if n.startswith(f"{self.namespace}-{prefix}-")])
        names = [f"{self.namespace}-{prefix}-{base + i}" for i in range(count)]
        taint = TAINT.get(instance_type)
        for name in names:
            self.k8s.add_node(
                name,
                labels={"node.kubernetes.io/instance-type": instance_type, HEALTH_LABEL:
                        "Schedulable"},
                taints=[{"key": taint, "effect": "NoSchedule"}] if taint else [],
                allocatable={"pods": "110", **ALLOCATABLE.get(
                    instance_type, {"cpu": "64", "memory": "256Gi"})})
        self.nodes += names
        return names

    def kubectl(self, *args: str, check: bool = True) -> str:
        """The real kubectl as the cluster's user; stdout (and stderr when not checked)."""
        proc = self.k8s.kubectl(*args, kubeconfig=self.kubeconfig, check=check)
        return proc.stdout + (proc.stderr if not check else "")

    def operator(self, release: str = "ops-cluster",
                 values: Mapping[str, Any] = CLUSTER_SCOPE) -> Identity:
        return operator_identity(self.k8s, release, values)

    def requests(self, user: str) -> list[AuditRecord]:
        """What `user` asked the API server since this test began, from its audit log (less
        the tests' own `kubectl auth can-i` checks with that user's token)."""
        return [r for r in self.k8s.audit(user=user, since=self.started)
                if not r.user_agent.startswith("kubectl")]

    def clean_up(self) -> None:
        """Jobs, pods and nodes go now (so no later test's operator sees them); the namespace
        controller removes the rest in the background."""
        self.kubelet.close()
        ns = self.namespace
        for path in (f"/apis/llamajob.dev/v1alpha1/namespaces/{ns}/llamatrainingjobs",
                     f"/api/v1/namespaces/{ns}/pods?gracePeriodSeconds=0"):
            self.k8s.request("DELETE", path)
        for name in self.nodes:
            self.k8s.request("DELETE", f"/api/v1/nodes/{name}")
        self.k8s.request("DELETE", f"/api/v1/namespaces/{ns}")
        for claim in self.claims:
            self.k8s.request("DELETE", f"/api/v1/persistentvolumes/{ns}-{claim}")
        for plural, name in self.cleanups:
            self.k8s.request("DELETE", self.client.path(plural, None, name))


def make_cluster(k8s: ControlPlane, workdir: Path, name: str | None = None,
                 claims: tuple[str, ...] = CLAIMS) -> Cluster:
    """A fresh namespace with a bound PersistentVolumeClaim for each of `claims`."""
    namespace = name or f"t{next(_TESTS)}"
    workdir.mkdir(parents=True, exist_ok=True)
    k8s.create_namespace(namespace)
    for claim in claims:
        add_bound_claim(k8s, namespace, claim)
    client = Client(k8s, namespace)
    kubeconfig = set_namespace(
        k8s.write_kubeconfig(workdir / "kubeconfig", ADMIN_TOKEN, "admin"), namespace)
    return Cluster(k8s=k8s, namespace=namespace, client=client,
                   kubelet=Kubelet(client, namespace), kubeconfig=kubeconfig, claims=claims)


@pytest.fixture(name="cluster")
def cluster_fixture(k8s: ControlPlane, crd: dict[str, Any], tmp_path: Path) -> Iterator[Cluster]:
    """A namespace of its own on the session's control plane, with the CRD installed and a
    bound `fsx-claim`; its jobs, pods and nodes are removed afterwards."""
    cluster = make_cluster(k8s, tmp_path)
    try:
        yield cluster
    finally:
        cluster.clean_up()


# --- rank 0's metrics ---------------------------------------------------------------------------
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

    def __init__(self, job: str, namespace: str) -> None:
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


# --- scenario helpers (shared by the operator tests) ----------------------------------------
JOB = "llm"


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
    wherever the scheduler put it."""
    size = example_args.get("nodes") or 1
    nodes = cluster.add_nodes(size + spare_nodes)
    doc = example("llama3-8b.yaml", **example_args)
    doc["spec"]["compile"]["enabled"] = False
    apply(cluster, doc, tmp_path)
    train = gang(cluster, "train", 1, size)
    run_all(cluster, train)
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


def run_all(cluster: Cluster, members: Sequence[dict[str, Any]]) -> list[str]:
    """Each pod runs once bound; returns their nodes, in order."""
    return [cluster.kubelet.run(pod["metadata"]["name"]) for pod in members]


def node_of(cluster: Cluster, pod: dict[str, Any]) -> str:
    return cluster.kubelet.bound(pod["metadata"]["name"])


def finish_all(cluster: Cluster, members: Sequence[dict[str, Any]], code: int = 0,
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
                                        key=lambda e: int(e["metadata"]["resourceVersion"]))]


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in pod["spec"]["containers"][0]["env"]}


def assert_permitted(requests: Sequence[AuditRecord], *, scope: str,
                     namespaces: set[str] | None = None, peering: bool = False) -> None:
    """The operator's requests, as the API server's audit log has them: none refused by RBAC,
    and every one allowed by permissions.py (the source of the chart's rules) with RBAC's
    scoping: a namespaced request may use the Role and the ClusterRole, a cluster-wide one only
    the ClusterRole."""
    assert requests, "the operator made no requests"
    refused = sorted({(r.verb, r.uri.split("?")[0], r.code) for r in requests
                      if r.code in (401, 403)})
    assert not refused, f"the API server refused the operator: {refused}"
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
    assert any(r.verb == "create" for r in requests), "no writes recorded at all"


def uses_of(records: Sequence[AuditRecord], verb: str, resource: str) -> list[AuditRecord]:
    return [r for r in records if r.verb == verb and r.resource == resource
            and not r.subresource]

