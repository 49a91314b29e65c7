"""Operator latency and scale, against a real Kubernetes control plane.

Runs `llamajob operator` as a real process (its RSS is measured) against the control plane of
``tests/k8s_control_plane.py``: etcd, kube-apiserver, kube-controller-manager (garbage
collector, PV binder, EndpointSlices...) and kube-scheduler, built from source. The operator
authenticates as its own ServiceAccount, bound to exactly the ClusterRole the Helm chart grants
(``llamajob.permissions``), so its requests are told apart in the API server's audit log by
user, go through real admission and RBAC, and fall under API Priority and Fairness as a
workload ServiceAccount does.

No kubelet runs: the real scheduler binds pods to Nodes, and this script plays the kubelet
(``Kubelet``), driven by a watch on the pods: it writes a bound pod's status through the status
subresource (Running with podIP 127.0.0.1, Ready conditions and a running "trainer"
container; or Failed with a terminated exit code), and completes graceful deletions: a bound,
non-terminal pod deleted by the operator only gets a deletionTimestamp, and the script deletes
it again with gracePeriodSeconds=0 (uid precondition), as a kubelet does once the containers
stopped (here: at once).

Nodes: every training pod requests all of its trn1.32xlarge's devices (16
aws.amazon.com/neuron, 8 vpc.amazonaws.com/efa) and the gang has one-pod-per-node anti-affinity,
so one pod needs one whole Node; 1,600 pods need 1,600 Nodes. The script creates 1,616 Node
objects (100 x 16, plus the 16 of the restart job) labelled, tainted and sized like HyperPod
trn1.32xlarge nodes, before the operator starts. Fewer, bigger nodes would be a machine that
does not exist, and would make the scheduler's and the operator's node watches unrealistically
small. The pods mount the job's shared-filesystem claim (fsx-claim), so a bound PV/PVC pair is
made too, or the scheduler would never place them.

Timestamps are the API server's: the audit log's requestReceivedTimestamp (microseconds) of the
requests involved, never this script's polling nor metadata.creationTimestamp (whole seconds).

1. Restart latency: one 16-node job; for each of N faults, once the gang runs, one pod is
   marked Failed; recorded is the time from the receipt of that status write to the receipt of
   the operator's 16th replacement-pod create (backoffSeconds 0: the operator's reaction, its
   status write, the gang deletion, the kubelet's graceful-deletion round trip of the 15
   survivors, and the creates). Also reported: the same to the scheduler's 16th binding, and
   the p50 of each stage.
2. Scale: 100 jobs of 16 nodes created at once (8 concurrent creates); time from the receipt of
   the first job's create to the receipt of the operator's create of the last of the 1,600
   pods (and to the scheduler's last binding); the operator's RSS; API requests per job until
   the operator has been quiet for 3 s, keyed "verb resource" as the audit log names them (RBAC
   verbs: create, patch, watch...). The kubelet leaves these pods Pending (bound, as if pulling
   the image), as the emulator-based version of this benchmark did, so the counts compare.
3. Idle: every pod Running and rank 0 (served by this script: every pod IP is 127.0.0.1)
   reporting a constant step, so the progress timer keeps scraping; API requests per job per
   minute over a quiet window.

Before measuring, the script waits for the controller-manager's TTL controller to finish
annotating the new Nodes (1,720 Node patches for 1,616 Nodes, about 90 s at its client's 20
requests/s; earlier Nodes are annotated again as the cluster grows past 100, 500 and 1,000
nodes), and for the operator to have
opened every watch (kopf feeds the initial 1,616 Nodes through its handlers first, about 8 s):
neither is the steady state the figures describe.

Compile is disabled in these jobs: the first gang is the training gang. Prints progress to
stderr and one JSON line at the end. A default run takes about 5 minutes on a 2-core machine
(control plane 4 s, 1,616 Nodes 6 s, TTL settle 90 s, operator start 8 s, 20 faults 35 s,
scale about 1 minute, idle about 1.5 minutes with the 60-s window); ``--quick`` (3 faults, 10
jobs, a 25-s window) about 1.5 minutes. ``--workdir DIR`` keeps the audit log and the logs.
The API server, etcd, scheduler, controller-manager, operator and this script share the
machine's cores, so the figures include their contention.

Run: ``.venv/bin/python benchmarks/operator_latency.py [--quick]`` (builds the control plane
with tools/k8s/build.sh on first use, or takes it from $KUBEBUILDER_ASSETS).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from k8s_control_plane import ADMIN_TOKEN, AuditRecord, ControlPlane  # noqa: E402
from kube_cluster import metrics_server  # noqa: E402
from llamajob import render  # noqa: E402
from llamajob.api import GROUP, PLURAL, VERSION  # noqa: E402
from llamajob.images import with_trainer_image  # noqa: E402
from llamajob.jobfile import parse_job  # noqa: E402
from llamajob.permissions import grants, policy_rules  # noqa: E402
from llamajob.plan import make_plan  # noqa: E402

T = TypeVar("T")
NS = "default"
OPERATOR_NS, OPERATOR_SA = "llamajob-system", "llamajob-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
SCHEDULER_USER = "system:kube-scheduler"
KUBELET_USER = "admin"  # the script's kubelet and set-up use the admin token
TTL_USER = "system:serviceaccount:kube-system:ttl-controller"
CRD_FILE = ROOT / "crds" / f"{PLURAL}.{GROUP}.yaml"
JOBS_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
PODS_PATH = f"/api/v1/namespaces/{NS}/pods"
CLAIM = "fsx-claim"
TERMINAL = ("Succeeded", "Failed")


# What a chart install passes the operator (trainerImage); the jobs set no image of their own.
TRAINER_IMAGE = "registry.example/llamajob-trainer:0.1.0-trn1"


def job_manifest(name: str, nodes: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["cluster"]["nodes"] = nodes
    doc["spec"]["compile"]["enabled"] = False
    doc["spec"]["restartPolicy"] = {"maxRestarts": 1000, "backoffSeconds": 0,
                                    "hangTimeoutSeconds": 0, "avoidFaultyNodes": False}
    return doc


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-train-a{attempt}-{rank}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def wait_for(what: str, check: Callable[[], T | bool | None], timeout: float,
             interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- a keep-alive API client ---------------------------------------------------------------------
class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path} -> {status}: {str(body)[:500]}")
        self.status = status


class Api:
    """HTTPS with one kept-alive connection per thread. ControlPlane.request opens a TLS
    connection per call; the kubelet and the node set-up make thousands of requests, and a
    handshake each would cost more CPU than the requests on a 2-core machine."""

    def __init__(self, server: str, cafile: Path, token: str, user_agent: str) -> None:
        url = urllib.parse.urlsplit(server)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.context = ssl.create_default_context(cafile=str(cafile))
        self.headers = {"Authorization": f"Bearer {token}", "User-Agent": user_agent,
                        "Accept": "application/json"}
        self.local = threading.local()

    def _connection(self, timeout: float | None = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                           timeout=timeout)

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(3):
            conn = getattr(self.local, "conn", None) or self._connection()
            self.local.conn = conn
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                # A kept-alive connection the server closed: reconnect and send again.
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None, *,
           content_type: str = "application/json", accept: Iterable[int] = ()) -> Any:
        status, payload = self.request(method, path, body, content_type)
        if not 200 <= status < 300 and status not in accept:
            raise ApiError(method, path, status, payload)
        return payload

    def watch(self, path: str) -> Iterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it."""
        conn = self._connection(timeout=None)
        try:
            conn.request("GET", path, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise ApiError("GET", path, resp.status, resp.read())
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


# --- the audit log, read incrementally ---------------------------------------------------------
class AuditTail:
    """The audit log's records, read from where the last call stopped: ControlPlane.audit
    re-parses the whole file each call, which over ~50,000 records would cost seconds of the
    CPU the measured components share."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen: set[str] = set()
        self.records: list[AuditRecord] = []

    def read(self, settle: float = 0.3) -> list[AuditRecord]:
        if settle:
            time.sleep(settle)  # the log is written as each response completes
        if self.path.exists():
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
            end = chunk.rfind(b"\n") + 1  # a line being written is read next time
            self.offset += end
            for line in chunk[:end].splitlines():
                event = json.loads(line)
                if event["auditID"] in self.seen:
                    continue  # a watch's ResponseComplete after its ResponseStarted
                self.seen.add(event["auditID"])
                self.records.append(AuditRecord.of(event))
        return self.records

    def between(self, since: float, until: float = float("inf"),
                user: str | None = None) -> list[AuditRecord]:
        return [r for r in self.read() if since <= r.received < until
                and (user is None or r.user == user)]


def kind(r: AuditRecord) -> str:
    """'verb resource[/subresource]', as RBAC names a request."""
    res = f"{r.resource}/{r.subresource}" if r.subresource else (r.resource or r.uri)
    return f"{r.verb} {res}"


# --- the kubelet the cluster lacks ---------------------------------------------------------------
class Kubelet:
    """Every node's kubelet at once, fed by one watch on the jobs' pods: runs bound pods (while
    ``autorun``), fails one on request, and completes the graceful deletion of bound pods."""

    def __init__(self, api: Api, workers: int = 8) -> None:
        self.api = api
        self.pods: dict[str, dict[str, Any]] = {}
        self.started: set[str] = set()  # uids whose Running status was written
        self.finished: set[str] = set()  # uids whose grace-0 delete was sent
        self.autorun = False
        self.errors: list[str] = []
        self.cond = threading.Condition()
        # Many kubelets act in parallel in a cluster; one thread each would be 1,616 here.
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="kubelet")
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="kubelet-watch")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        selector = urllib.parse.quote(render.LABEL_JOB)
        rv = ""
        while not self.stopped:
            try:
                if not rv:
                    listing = self.api.ok("GET", f"{PODS_PATH}?labelSelector={selector}")
                    with self.cond:
                        self.pods = {p["metadata"]["name"]: p for p in listing["items"]}
                        for pod in self.pods.values():
                            self._act(pod)
                        self.cond.notify_all()
                    rv = listing["metadata"]["resourceVersion"]
                path = (f"{PODS_PATH}?watch=1&labelSelector={selector}&resourceVersion={rv}"
                        "&allowWatchBookmarks=true&timeoutSeconds=600")
                for event in self.api.watch(path):
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        rv = ""  # 410 Gone: list again
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    with self.cond:
                        if event["type"] == "DELETED":
                            self.pods.pop(name, None)
                        else:
                            self.pods[name] = obj
                            self._act(obj)
                        self.cond.notify_all()
            except Exception as exc:  # the control plane stopping ends the stream too
                if self.stopped:
                    return
                self.errors.append(f"watch: {exc}")
                time.sleep(0.2)

    def _act(self, pod: dict[str, Any]) -> None:
        """What a kubelet does about this pod now; called with the lock held."""
        meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
        uid, bound = meta["uid"], bool(spec.get("nodeName"))
        phase = status.get("phase")
        if meta.get("deletionTimestamp"):
            # The API server removes unbound and terminal pods at once; a bound, live one
            # waits for its kubelet to confirm the containers stopped.
            if bound and phase not in TERMINAL and uid not in self.finished:
                self.finished.add(uid)
                self.pool.submit(self._finish_deletion, meta["name"], uid)
        elif self.autorun and bound and phase == "Pending" and uid not in self.started:
            self.started.add(uid)
            self.pool.submit(self._run, meta["name"], uid)

    def set_autorun(self, on: bool) -> None:
        with self.cond:
            self.autorun = on
            for pod in self.pods.values():
                self._act(pod)

    def _patch_status(self, name: str, status: dict[str, Any]) -> None:
        # Strategic merge, as the kubelet's status manager: conditions merge by type (the
        # scheduler's PodScheduled stays) and containerStatuses by name.
        code, body = self.api.request("PATCH", f"{PODS_PATH}/{name}/status", {"status": status},
                                      "application/strategic-merge-patch+json")
        if code != 200 and code != 404:
            self.errors.append(f"status of {name}: {code} {str(body)[:300]}")

    def _run(self, name: str, uid: str) -> None:
        now = now_iso()
        self._patch_status(name, {
            "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "hostIP": "127.0.0.1", "startTime": now,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                           for t in ("Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{
                "name": render.CONTAINER, "ready": True, "started": True, "restartCount": 0,
                "image": TRAINER_IMAGE, "imageID": "",
                "state": {"running": {"startedAt": now}}}],
        })

    def fail(self, name: str, exit_code: int = 1) -> None:
        now = now_iso()
        self._patch_status(name, {
            "phase": "Failed",
            "conditions": [{"type": t, "status": "False", "lastTransitionTime": now}
                           for t in ("ContainersReady", "Ready")],
            "containerStatuses": [{
                "name": render.CONTAINER, "ready": False, "started": False, "restartCount": 0,
                "image": TRAINER_IMAGE, "imageID": "",
                "state": {"terminated": {"exitCode": exit_code, "reason": "Error",
                                         "startedAt": now, "finishedAt": now}}}],
        })

    def _finish_deletion(self, name: str, uid: str) -> None:
        code, body = self.api.request("DELETE", f"{PODS_PATH}/{name}", {
            "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid}})
        if code not in (200, 202, 404, 409):
            self.errors.append(f"delete of {name}: {code} {str(body)[:300]}")

    def wait(self, what: str, check: Callable[[dict[str, dict[str, Any]]], bool],
             timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not check(self.pods):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                       f"kubelet errors: {self.errors[-5:]}")
                self.cond.wait(min(left, 1.0))


def phase_of(pods: dict[str, dict[str, Any]], name: str) -> str | None:
    pod = pods.get(name)
    return None if pod is None else (pod.get("status") or {}).get("phase")


# --- rank 0's metrics ---------------------------------------------------------------------------
class Steps:
    """Rank 0's metrics for every job from one endpoint (every pod's IP is 127.0.0.1; the
    operator picks its job's sample by the job label, as it does with the real trainer)."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}
        self.requests = 0
        self.server = metrics_server(self._render)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _render(self) -> bytes:
        self.requests += 1
        lines = ["# TYPE llamajob_train_step gauge"]
        lines += [f'llamajob_train_step{{job="{j}",namespace="{NS}"}} {s}'
                  for j, s in list(self.steps.items())]
        lines += ["# TYPE llamajob_train_loss gauge"]
        lines += [f'llamajob_train_loss{{job="{j}",namespace="{NS}"}} 2.5'
                  for j in list(self.steps)]
        return ("\n".join(lines) + "\n").encode()


# --- the cluster ---------------------------------------------------------------------------------
def gang_shape() -> tuple[dict[str, str], list[dict[str, str]], dict[str, str]]:
    """(nodeSelector, taints, allocatable) of a trn1.32xlarge node that fits one pod of the
    rendered gang, taken from the operator's own renderer so the two cannot drift apart."""
    doc = job_manifest("probe", 16)
    doc["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    job, _ = with_trainer_image(parse_job(doc), {"trn1": TRAINER_IMAGE})
    spec = render.render_gang(job, make_plan(job.spec), render.ROLE_TRAIN, 1)[0]["spec"]
    requests = spec["containers"][0]["resources"]["requests"]
    taints = [{"key": t["key"], "effect": t["effect"]} for t in spec.get("tolerations", [])
              if t.get("operator") == "Exists" and t.get("key")]
    # The host's cpu and memory (the pod asks for 90% of them) and the devices it requests.
    allocatable = {"cpu": "128", "memory": "512Gi", "pods": "110",
                   **{k: str(v) for k, v in requests.items() if k not in ("cpu", "memory")}}
    return dict(spec["nodeSelector"]), taints, allocatable


def add_nodes(api: Api, names: list[str]) -> None:
    """As ControlPlane.add_node (create, then a Ready status through the status subresource),
    over kept-alive connections from a few threads."""
    labels, taints, allocatable = gang_shape()

    def one(name: str) -> None:
        api.ok("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
            "spec": {"taints": taints}}, accept=(409,))
        now = now_iso()
        api.ok("PATCH", f"/api/v1/nodes/{name}/status", {"status": {
            "capacity": allocatable, "allocatable": allocatable,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "set by the benchmark", "lastHeartbeatTime": now,
                            "lastTransitionTime": now}]}},
            content_type="application/merge-patch+json")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, names))


def prepare(cp: ControlPlane, api: Api, audit: AuditTail, node_names: list[str]) -> Path:
    """CRD, namespaces, the shared claim, the nodes and the operator's RBAC; returns the
    operator's kubeconfig."""
    cp.kubectl("apply", "-f", str(CRD_FILE))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=30s",
               f"crd/{PLURAL}.{GROUP}")
    cp.create_namespace(OPERATOR_NS)
    # The ServiceAccount admission plugin refuses pods until the namespace's default SA exists.
    wait_for("the default ServiceAccount", lambda: cp.request(
        "GET", f"/api/v1/namespaces/{NS}/serviceaccounts/default").status == 200, 30, 0.2)
    api.ok("POST", f"/api/v1/namespaces/{NS}/secrets", {
        "metadata": {"name": "hf-token"}, "stringData": {"token": "not-a-token"}})
    api.ok("POST", "/api/v1/persistentvolumes", {"metadata": {"name": "bench-fsx"}, "spec": {
        "capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
        "nfs": {"server": "fsx.example.invalid", "path": "/"},
        "claimRef": {"namespace": NS, "name": CLAIM}}})
    api.ok("POST", f"/api/v1/namespaces/{NS}/persistentvolumeclaims", {
        "metadata": {"name": CLAIM}, "spec": {
            "accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": "bench-fsx",
            "resources": {"requests": {"storage": "1Ti"}}}})
    # The scheduler's volume binding waits for the PV controller to complete the bind.
    wait_for("the claim to be Bound", lambda: (api.ok(
        "GET", f"/api/v1/namespaces/{NS}/persistentvolumeclaims/{CLAIM}").get("status") or {}
    ).get("phase") == "Bound", 60, 0.2)
    begin, since = time.monotonic(), time.time()
    add_nodes(api, node_names)
    print(f"{len(node_names)} nodes in {time.monotonic() - begin:.1f} s", file=sys.stderr)
    # The controller-manager's TTL controller annotates every Node with a TTL that depends on
    # the cluster's size, again as the count crosses 100, 500 and 1,000: about 1,700 Node
    # patches at its 20 requests/s, each a Node event for the operator and the scheduler. In a
    # real cluster the Nodes are old and it is quiet; so wait for it here.
    quiet_since(audit, since, 5.0, 600, user=TTL_USER)
    print(f"TTL controller quiet {time.monotonic() - begin:.1f} s after the first node",
          file=sys.stderr)

    # The operator's own identity with the chart's cluster-scope grant, no more.
    rules = policy_rules(grants("cluster", peering=False).cluster)
    api.ok("POST", f"/api/v1/namespaces/{OPERATOR_NS}/serviceaccounts",
           {"metadata": {"name": OPERATOR_SA}})
    api.ok("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles",
           {"metadata": {"name": OPERATOR_SA}, "rules": rules})
    api.ok("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "metadata": {"name": OPERATOR_SA},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": OPERATOR_SA},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA,
                      "namespace": OPERATOR_NS}]})
    token = cp.token_for(OPERATOR_NS, OPERATOR_SA, seconds=6 * 3600)
    op_api = Api(cp.server, cp.pki / "ca.crt", token, "benchmark-rbac-check")
    # The authorizer reads bindings from an informer: wait until it grants the operator.
    wait_for("the operator's ClusterRoleBinding to take effect", lambda: op_api.ok(
        "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"namespace": NS, "verb": "create",
                                            "resource": "pods"}}})["status"]["allowed"],
        15, 0.2)
    return cp.write_kubeconfig(cp.workdir / "operator.kubeconfig", token, OPERATOR_SA)


def start_operator(kubeconfig: Path, trainer_port: int, log: Path) -> tuple[
    subprocess.Popen[bytes], int
]:
    metrics_port, liveness_port = free_port(), free_port()
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    argv = [str(Path(sys.executable).parent / "llamajob"), "operator",
            "--metrics-port", str(metrics_port), "--liveness-port", str(liveness_port),
            "--trainer-metrics-port", str(trainer_port), f"--trainer-image=trn1={TRAINER_IMAGE}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited early:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=1):
                return proc, metrics_port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("operator did not become live")


def operator_ready(audit: AuditTail, since: float, timeout: float = 300) -> float:
    """Wait until the operator has opened the watch of every resource it follows, as the audit
    log shows; returns when the last one was received. kopf starts a watch after it has fed the
    initial list through its handlers and indices (1,616 Nodes take seconds), and handles no
    job before every index is filled: measuring before then would time its start-up."""
    wanted = {"customresourcedefinitions", PLURAL, "pods", "services", "configmaps", "nodes"}

    def watches() -> float | None:
        mine = [r for r in audit.between(since, user=OPERATOR_USER) if r.verb == "watch"]
        if {r.resource for r in mine} >= wanted:
            return max(r.received for r in mine)
        return None

    return wait_for("the operator's initial lists and watches", watches, timeout, 0.5)


def terminated_watchers(api: Api) -> dict[str, float]:
    """apiserver_terminated_watchers_total: watches the API server closed because the client
    did not keep up with its events (kopf then watches again from its last resourceVersion)."""
    status, text = api.request("GET", "/metrics")
    out: dict[str, float] = {}
    if status == 200 and isinstance(text, str):
        for line in text.splitlines():
            if line.startswith("apiserver_terminated_watchers_total"):
                labels, _, value = line.rpartition(" ")
                out[labels.partition("{")[2].rstrip("}")] = float(value)
    return out


def job_running(api: Api, job: str, attempt: int) -> bool:
    st = api.ok("GET", f"{JOBS_PATH}/{job}").get("status") or {}
    cond = next((c for c in st.get("conditions", []) if c["type"] == "Running"), {})
    return st.get("attempt") == attempt and cond.get("status") == "True"


# --- the measurements ----------------------------------------------------------------------------
def restart_latency(api: Api, kubelet: Kubelet, audit: AuditTail, faults: int) -> dict[str, Any]:
    job, size = "restart", 16
    kubelet.set_autorun(True)
    api.ok("POST", JOBS_PATH, job_manifest(job, size))
    trials: list[tuple[float, str, set[str]]] = []  # (wall clock before the fault, victim, new)
    for attempt in range(1, faults + 1):
        names = [pod_name(job, attempt, r) for r in range(size)]
        kubelet.wait(f"gang {attempt} running", lambda pods, names=names: all(
            phase_of(pods, n) == "Running" for n in names), 90)
        wait_for("the job's Running condition", lambda a=attempt: job_running(api, job, a),
                 30, 0.05)
        time.sleep(0.2)  # let the operator's writes for the formed gang land first
        victim = names[attempt % size]
        wanted = {pod_name(job, attempt + 1, r) for r in range(size)}
        trials.append((time.time(), victim, wanted))
        kubelet.fail(victim)
        kubelet.wait(f"replacement gang {attempt + 1}", lambda pods, w=wanted: w <= pods.keys(),
                     60)
    last = trials[-1][2]
    kubelet.wait("the last gang running", lambda pods: all(
        phase_of(pods, n) == "Running" for n in last), 90)
    records = audit.read(settle=1.0)

    latencies, bound = [], []
    stages: dict[str, list[float]] = {"operator_first_delete": [], "old_gang_gone": [],
                                      "operator_first_create": []}
    per_fault: Counter[str] = Counter()
    ends = [t for t, _, _ in trials[1:]] + [float("inf")]
    for (since, victim, wanted), end in zip(trials, ends, strict=True):
        recs = [r for r in records if since <= r.received < end]
        # Everything the operator asked for because of this fault (and the new gang forming).
        per_fault.update(kind(r) for r in recs if r.user == OPERATOR_USER)
        t0 = min(r.received for r in recs if r.user == KUBELET_USER and r.verb == "patch"
                 and r.resource == "pods" and r.subresource == "status" and r.name == victim)
        creates = [r.received for r in recs if r.user == OPERATOR_USER and r.verb == "create"
                   and r.resource == "pods" and r.name in wanted and r.code == 201]
        binds = [r.received for r in recs if r.user == SCHEDULER_USER and r.verb == "create"
                 and r.subresource == "binding" and r.name in wanted and r.code == 201]
        t_create = min(creates)
        deletes = [r.received for r in recs if r.user == OPERATOR_USER and r.verb == "delete"
                   and r.resource == "pods" and r.received < t_create]
        finals = [r.received for r in recs if r.user == KUBELET_USER and r.verb == "delete"
                  and r.resource == "pods" and r.received < t_create]
        if len(creates) != len(wanted) or len(binds) != len(wanted):
            raise RuntimeError(f"audit log: {len(creates)} creates, {len(binds)} bindings of "
                               f"{len(wanted)} pods after the fault of {victim}")
        latencies.append(max(creates) - t0)
        bound.append(max(binds) - t0)
        stages["operator_first_delete"].append(min(deletes) - t0)
        stages["old_gang_gone"].append((max(finals) if finals else min(deletes)) - t0)
        stages["operator_first_create"].append(t_create - t0)
    api.ok("DELETE", f"{JOBS_PATH}/{job}")
    # The garbage collector deletes its pods; the kubelet completes their graceful deletion.
    kubelet.wait("the restart job's pods gone", lambda pods: not any(
        n.startswith(f"{job}-") for n in pods), 120)
    return {"latencies": latencies, "bound": bound,
            "stages_p50": {k: round(statistics.median(v), 4) for k, v in stages.items()},
            "operator_requests_per_fault": {k: round(v / len(trials), 2)
                                            for k, v in per_fault.most_common()}}


def quiet_since(audit: AuditTail, since: float, quiet: float, timeout: float,
                user: str = OPERATOR_USER) -> float:
    """Wait until ``user`` has made no request for ``quiet`` seconds; returns then."""
    deadline = time.monotonic() + timeout
    while True:
        mine = audit.between(since, user=user)
        last = max((r.received for r in mine), default=since)
        if time.time() - last >= quiet or time.monotonic() > deadline:
            return time.time()
        time.sleep(0.5)


def scale(api: Api, kubelet: Kubelet, audit: AuditTail, jobs: int, size: int,
          operator_pid: int) -> dict[str, Any]:
    kubelet.set_autorun(False)  # bound pods stay Pending, as if the image were being pulled
    names = [f"bench-{j}" for j in range(jobs)]
    manifests = [job_manifest(n, size) for n in names]
    wanted = {pod_name(n, 1, r) for n in names for r in range(size)}
    since = time.time()
    with ThreadPoolExecutor(8) as pool:  # "at once": as fast as a client can create them
        list(pool.map(lambda doc: api.ok("POST", JOBS_PATH, doc), manifests))
    kubelet.wait(f"{len(wanted)} pods", lambda pods: wanted <= pods.keys(), 600)
    rss_after_create = rss_mib(operator_pid)[0]
    kubelet.wait(f"{len(wanted)} pods bound", lambda pods: all(
        pods[n]["spec"].get("nodeName") for n in wanted if n in pods), 900)
    until = quiet_since(audit, since, 3.0, 120)
    records = audit.between(since, until)
    t0 = min(r.received for r in records if r.user == KUBELET_USER and r.verb == "create"
             and r.resource == PLURAL)
    creates = [r.received for r in records if r.user == OPERATOR_USER and r.verb == "create"
               and r.resource == "pods" and r.name in wanted and r.code == 201]
    binds = [r.received for r in records if r.user == SCHEDULER_USER and r.verb == "create"
             and r.subresource == "binding" and r.name in wanted and r.code == 201]
    mine = [r for r in records if r.user == OPERATOR_USER]
    return {
        "jobs100_all_pods_seconds": max(creates) - t0,
        "jobs100_all_bound_seconds": max(binds) - t0,
        "pods_created": len(creates),
        "rss_after_create_mib": rss_after_create,
        "api_requests_per_job": len(mine) / jobs,
        "api_requests_by_verb": dict(Counter(kind(r) for r in mine).most_common()),
        "api_requests_by_agent": dict(Counter(r.user_agent.split("/")[0] for r in mine)),
        "api_requests_not_2xx": dict(Counter(f"{kind(r)} {r.code}" for r in mine
                                             if not 200 <= r.code < 300)),
        "others_requests_by_user": dict(Counter(r.user for r in records
                                                if r.user != OPERATOR_USER).most_common()),
        "names": names,
    }


def idle(api: Api, kubelet: Kubelet, audit: AuditTail, names: list[str], size: int,
         steps: Steps, seconds: float, interval: float) -> dict[str, Any]:
    for n in names:
        steps.steps[n] = 100
    pods = {pod_name(n, 1, r) for n in names for r in range(size)}
    kubelet.set_autorun(True)
    kubelet.wait(f"{len(pods)} pods running", lambda p: all(
        phase_of(p, n) == "Running" for n in pods), 600)

    def settled() -> bool:
        for job in api.ok("GET", JOBS_PATH)["items"]:
            st = job.get("status") or {}
            cond = next((c for c in st.get("conditions", []) if c["type"] == "Running"), {})
            if st.get("step") != 100 or st.get("attempt") != 1 or cond.get("status") != "True":
                return False
        return True

    wait_for("every job running and reporting step 100", settled, 120 + 2 * interval, 0.5)
    time.sleep(2.0)
    since, scrapes = time.time(), steps.requests
    time.sleep(seconds)
    until = time.time()
    mine = audit.between(since, until, user=OPERATOR_USER)
    return {
        "idle_requests_per_job_minute": len(mine) / len(names) * 60.0 / seconds,
        "idle_window_seconds": seconds,
        "idle_requests_total": len(mine),
        "idle_requests_by_verb": dict(Counter(kind(r) for r in mine)),
        "idle_scrapes_of_rank0": steps.requests - scrapes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--nodes", type=int, default=16, help="nodes (pods) per job")
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the control plane's files (audit log, component logs) and the "
                   "operator's log here instead of a temporary directory")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 3 faults, 10 jobs, a 25-s idle window (about 1.5 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.faults, args.jobs, args.idle_seconds = 3, 10, 25.0
    begin = time.monotonic()
    steps = Steps()
    with tempfile.TemporaryDirectory(prefix="operator-latency-") as scratch:
        tmp = args.workdir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        cp = ControlPlane(tmp / "k8s")
        cp.start()
        print(f"control plane up in {cp.start_seconds['total']:.1f} s", file=sys.stderr)
        kubelet: Kubelet | None = None
        proc: subprocess.Popen[bytes] | None = None
        log = tmp / "operator.log"
        try:
            api = Api(cp.server, cp.pki / "ca.crt", ADMIN_TOKEN, "benchmark-kubelet/1")
            audit = AuditTail(cp.audit_log)
            nodes = [f"trn1-{i:04d}" for i in range(args.jobs * args.nodes + 16)]
            kubeconfig = prepare(cp, api, audit, nodes)
            kubelet = Kubelet(api)
            kubelet.start()
            spawned = time.time()
            proc, metrics_port = start_operator(kubeconfig, steps.port, log)
            ready = operator_ready(audit, spawned) - spawned
            rss_ready = rss_mib(proc.pid)[0]
            print(f"operator ready (every watch open) {ready:.1f} s after it started, "
                  f"RSS {rss_ready:.0f} MiB", file=sys.stderr)

            rs = restart_latency(api, kubelet, audit, args.faults)
            latencies = rs["latencies"]
            print(f"restart latency over {len(latencies)} faults: "
                  f"p50 {statistics.median(latencies):.3f} s, "
                  f"p99 {percentile(latencies, 0.99):.3f} s, max {max(latencies):.3f} s; "
                  f"to the 16th binding p50 {statistics.median(rs['bound']):.3f} s; "
                  f"stages p50 {rs['stages_p50']}", file=sys.stderr)
            sc = scale(api, kubelet, audit, args.jobs, args.nodes, proc.pid)
            print(f"{args.jobs} jobs x {args.nodes} pods: all pods after "
                  f"{sc['jobs100_all_pods_seconds']:.2f} s, bound after "
                  f"{sc['jobs100_all_bound_seconds']:.2f} s, "
                  f"{sc['api_requests_per_job']:.1f} API requests per job "
                  f"{sc['api_requests_by_verb']}", file=sys.stderr)
            quiet = idle(api, kubelet, audit, sc.pop("names"), args.nodes, steps,
                         args.idle_seconds, 20.0)
            print(f"idle: {quiet['idle_requests_total']} operator requests in "
                  f"{args.idle_seconds:.0f} s while rank 0 was scraped "
                  f"{quiet['idle_scrapes_of_rank0']} times", file=sys.stderr)
            rss, peak = rss_mib(proc.pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                own = resp.read().decode()
            kubelet_errors = list(kubelet.errors)
            dropped_watches = terminated_watchers(api)
        except BaseException:
            if log.exists():
                print(f"operator log tail:\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if kubelet is not None:
                kubelet.stop()
            cp.stop()
    own_restart = [line for line in own.splitlines()
                   if line.startswith("llamajob_restart_latency_seconds_")
                   and not line.startswith("llamajob_restart_latency_seconds_bucket")]
    result = {
        "backend": "kube-apiserver (tests/k8s_control_plane.py), audit-log timestamps",
        "restart_p50_seconds": round(statistics.median(latencies), 4),
        "restart_p99_seconds": round(percentile(latencies, 0.99), 4),
        "restart_max_seconds": round(max(latencies), 4),
        "restart_to_bound_p50_seconds": round(statistics.median(rs["bound"]), 4),
        "restart_stages_p50_seconds": rs["stages_p50"],
        "restart_operator_requests_per_fault": rs["operator_requests_per_fault"],
        "faults": len(latencies),
        "jobs100_all_pods_seconds": round(sc["jobs100_all_pods_seconds"], 3),
        "jobs100_all_bound_seconds": round(sc["jobs100_all_bound_seconds"], 3),
        "jobs": args.jobs,
        "pods_per_job": args.nodes,
        "nodes": args.jobs * args.nodes + 16,
        "operator_ready_seconds": round(ready, 2),
        "operator_rss_ready_mib": round(rss_ready, 1),
        "operator_rss_after_create_mib": round(sc["rss_after_create_mib"], 1),
        "operator_rss_mib": round(rss, 1),
        "operator_rss_peak_mib": round(peak, 1),
        "api_requests_per_job": round(sc["api_requests_per_job"], 2),
        "api_requests_by_verb": sc["api_requests_by_verb"],
        "api_requests_by_agent": sc["api_requests_by_agent"],
        "api_requests_not_2xx": sc["api_requests_not_2xx"],
        "scale_others_requests_by_user": sc["others_requests_by_user"],
        "idle_requests_per_job_minute": round(quiet["idle_requests_per_job_minute"], 4),
        "idle_window_seconds": quiet["idle_window_seconds"],
        "idle_scrapes_of_rank0": quiet["idle_scrapes_of_rank0"],
        "idle_requests_by_verb": quiet["idle_requests_by_verb"],
        "operator_restart_latency_histogram": own_restart,
        "apiserver_terminated_watchers": dropped_watches,
        "kubelet_errors": kubelet_errors[:5],
        "benchmark_seconds": round(time.monotonic() - begin, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
