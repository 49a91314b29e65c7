"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built from source by ``tools/k8s/build.sh`` and started on free localhost ports,
in the manner of controller-runtime's envtest.

What stands in for the kubelet: nothing. No kubelet, container runtime or kube-proxy runs, so
pods are scheduled and bound by the real scheduler but never start; a test that needs a pod to
be Running or Failed writes the pod's status itself. Nodes are plain API objects created by
:meth:`ControlPlane.add_node`, with a Ready condition written once through the status
subresource. The controller-manager runs without its node-lifecycle controller, which would
otherwise mark every such Node unreachable after 50 s because no kubelet renews its lease.

The flags are the ones recorded in ``tools/k8s/flags.md``.
"""

from __future__ import annotations

import calendar
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llamajob_trainer.lifeline import die_with

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "tools" / "k8s" / "build.sh"
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

# Static bearer tokens for --token-auth-file: the admin is in system:masters; the two
# components authenticate as the users the RBAC bootstrap policy already grants.
ADMIN_TOKEN = "admin-token"
KCM_TOKEN = "kcm-token"
SCHED_TOKEN = "sched-token"
TOKENS_CSV = (
    f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n'
    f"{KCM_TOKEN},system:kube-controller-manager,kcm-uid\n"
    f"{SCHED_TOKEN},system:kube-scheduler,sched-uid\n"
)

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    pass


def locate_binaries() -> Path:
    """The directory holding the four binaries: ``KUBEBUILDER_ASSETS`` if set, else what
    build.sh prints last (it reuses its cache, so only the first run on a machine compiles).

    A failed build raises with its output rather than skipping: a test that needs a real API
    server and silently does not run proves nothing."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        directory = Path(assets)
    else:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                              check=False)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise ControlPlaneError(
                f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n"
                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
            )
        directory = Path(lines[-1])
    missing = [name for name in COMPONENTS if not (directory / name).is_file()]
    if missing:
        raise ControlPlaneError(f"{directory} lacks {', '.join(missing)}")
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], T | None], timeout: float,
             interval: float = 0.1, on_timeout: Callable[[], str] = lambda: "") -> T:
    """Poll ``check`` until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}"
                                    + on_timeout())
        time.sleep(interval)


class ApiResponse:
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body

    def __repr__(self) -> str:
        return f"ApiResponse({self.status}, {self.body!r})"


@dataclass(frozen=True)
class AuditRecord:
    """One request as the API server's audit log has it."""

    user: str
    user_agent: str
    verb: str  # the RBAC verb: get, list, watch, create, update, patch, delete, ...
    group: str  # "" for the core group
    resource: str | None  # None for non-resource URLs (discovery, /healthz)
    subresource: str | None
    namespace: str | None
    name: str | None
    code: int
    uri: str
    received: float  # seconds since the epoch

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> AuditRecord:
        ref = event.get("objectRef") or {}
        stamp = event["requestReceivedTimestamp"]  # 2026-12-06T03:14:15.123456Z
        whole, _, fraction = stamp.rstrip("Z").partition(".")
        received = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(
            f"0.{fraction or 0}")
        return cls(user=event["user"].get("username", ""), user_agent=event.get("userAgent", ""),
                   verb=event["verb"], group=ref.get("apiGroup", ""),
                   resource=ref.get("resource"), subresource=ref.get("subresource"),
                   namespace=ref.get("namespace"), name=ref.get("name"),
                   code=int((event.get("responseStatus") or {}).get("code", 0)),
                   uri=event["requestURI"], received=received)

    @property
    def rbac(self) -> tuple[str, str, str] | None:
        """(group, resource[/subresource], verb) as an RBAC rule names it; None for
        non-resource URLs."""
        if self.resource is None:
            return None
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return (self.group, resource, self.verb)


class ControlPlane:
    """Start with :meth:`start`, stop with :meth:`stop`; everything lives under ``workdir``."""

    def __init__(self, workdir: Path, bin_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.pki = workdir / "pki"
        self.logs = workdir / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {name: free_port() for name in
                      ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager",
                       "kube-scheduler")}
        self.server = f"https://127.0.0.1:{self.ports['kube-apiserver']}"
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.audit_log = self.logs / "audit.jsonl"
        self.start_seconds: dict[str, float] = {}
        self._ssl: ssl.SSLContext | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        begin = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = locate_binaries()
        self.start_seconds["binaries"] = time.monotonic() - begin
        for directory in (self.pki, self.logs, self.workdir / "etcd"):
            directory.mkdir(parents=True, exist_ok=True)
        self._credentials()
        self._ssl = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN, "admin")
        self.write_kubeconfig(self.workdir / "kcm.kubeconfig", KCM_TOKEN, "kcm")
        self.write_kubeconfig(self.workdir / "sched.kubeconfig", SCHED_TOKEN, "sched")
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
        except BaseException:
            self.stop()
            raise
        self.start_seconds["total"] = time.monotonic() - begin

    def stop(self) -> None:
        """Stop everything but etcd together, then etcd: the API server exits about 2 s after
        SIGTERM while etcd is up, but hangs about 30 s retrying it when etcd goes first."""
        upper = [n for n in ("kube-scheduler", "kube-controller-manager", "kube-apiserver")
                 if n in self.procs]
        for name in upper:
            self._signal(name, signal.SIGTERM)
        for name in upper:
            self._reap(name, 15)
        if "etcd" in self.procs:
            self._signal("etcd", signal.SIGTERM)
            self._reap("etcd", 10)

    def _signal(self, name: str, sig: signal.Signals) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)

    def _reap(self, name: str, timeout: float) -> None:
        proc = self.procs.pop(name)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # --- credentials ----------------------------------------------------------------------
    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=self.pki, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")

    def _credentials(self) -> None:
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
                      "-out", "ca.crt", "-days", "1", "-subj", "/CN=llamajob-test-ca")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key",
                      "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver")
        (self.pki / "san.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes.default.svc\n")
        self._openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-CAcreateserial", "-out", "apiserver.crt", "-days", "1",
                      "-extfile", "san.ext")
        self._openssl("genrsa", "-out", "sa.key", "2048")
        self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        (self.pki / "tokens.csv").write_text(TOKENS_CSV)

    def write_kubeconfig(self, path: Path, token: str, user: str) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.server, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML, and needs no dependency
        return path

    # --- components -----------------------------------------------------------------------
    def _launch(self, name: str, args: Sequence[str]) -> None:
        assert self.bin_dir is not None
        log = (self.logs / f"{name}.log").open("ab")  # a restart appends
        parent = os.getpid()
        # Killed with this process however it ends (a test run interrupted or killed skips
        # the fixture's teardown): an orphaned etcd or API server would hold ports and memory.
        self.procs[name] = subprocess.Popen([str(self.bin_dir / name), *args], cwd=self.workdir,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            preexec_fn=lambda: die_with(parent, signal.SIGKILL))
        log.close()  # the child holds its own descriptor

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_healthy(self, name: str, check: Callable[[], bool], timeout: float) -> None:
        begin = time.monotonic()

        def alive_and_healthy() -> bool:
            code = self.procs[name].poll()
            if code is not None:
                raise ControlPlaneError(f"{name} exited with {code}; last lines of its log:\n"
                                        + self.log_tail(name))
            return check()

        wait_for(f"{name} to become healthy", alive_and_healthy, timeout,
                 on_timeout=lambda: f"; last lines of its log:\n{self.log_tail(name)}")
        self.start_seconds[name] = time.monotonic() - begin

    def _get_text(self, url: str, *, token: str | None = None, verify: bool = True) -> str | None:
        request = urllib.request.Request(url)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        context: ssl.SSLContext | None = None
        if url.startswith("https"):
            # The controller-manager and scheduler serve health on self-signed certificates.
            context = self._ssl if verify else ssl._create_unverified_context()
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                return str(resp.read().decode())
        except (OSError, urllib.error.URLError):
            return None

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._launch("etcd", [
            "--name=test", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}", "--unsafe-no-fsync",
        ])
        self._wait_healthy("etcd", lambda: '"health":"true"' in (
            self._get_text(f"{client}/health") or ""), timeout=30)

    def restart_apiserver(self) -> float:
        """Kill the API server and start it again on the same port and etcd, as a crash
        would; returns how long it was away. Every watch breaks, and the new server's watch
        cache starts at etcd's current revision, so a client resuming from an older
        resourceVersion may be told 410 Gone (too old) and must list again. (SIGKILL: with
        watches open, a SIGTERMed server drains them for about 30 s.)"""
        begin = time.monotonic()
        self._signal("kube-apiserver", signal.SIGKILL)
        self._reap("kube-apiserver", 30)
        self._start_apiserver()
        return time.monotonic() - begin

    def _start_apiserver(self) -> None:
        pki = self.pki
        self._launch("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['kube-apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            # Without a node-lifecycle controller nothing would lift the not-ready taint this
            # plugin puts on every new Node; off, a Node has exactly the taints a test gives it.
            "--disable-admission-plugins=TaintNodesByCondition",
            # Every request, at metadata level, as the record tests and the benchmark count and
            # check (who asked what, and the answer): see :meth:`audit`.
            f"--audit-policy-file={self._audit_policy()}", f"--audit-log-path={self.audit_log}",
            "--audit-log-mode=blocking", "--audit-log-maxsize=0",
        ])
        self._wait_healthy("kube-apiserver", lambda: self._get_text(
            f"{self.server}/readyz", token=ADMIN_TOKEN) == "ok", timeout=90)

    def _audit_policy(self) -> Path:
        # RequestReceived is left out: a watch is then recorded when its stream starts
        # (ResponseStarted) and every other request when it completes, each with its status.
        path = self.workdir / "audit-policy.json"
        path.write_text(json.dumps({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived"], "rules": [{"level": "Metadata"}]}))
        return path

    def audit(self, *, user: str | None = None, since: float = 0.0,
              settle: float = 0.3) -> list[AuditRecord]:
        """The requests the API server has answered (one record each, in order), optionally
        only ``user``'s and only those received after ``since`` (a ``time.time()``).

        ``settle``: the log is written as each response completes, so a request answered a
        moment ago may not be in it yet; reading waits this long first."""
        if settle:
            time.sleep(settle)
        seen: set[str] = set()
        records = []
        if not self.audit_log.exists():
            return []
        with self.audit_log.open() as log:
            for line in log:
                event = json.loads(line)
                if event["auditID"] in seen:
                    continue  # a watch's ResponseComplete after its ResponseStarted
                seen.add(event["auditID"])
                record = AuditRecord.of(event)
                if (user is None or record.user == user) and record.received >= since:
                    records.append(record)
        return records

    def _start_controllers(self) -> None:
        kcm = self.workdir / "kcm.kubeconfig"
        sched = self.workdir / "sched.kubeconfig"
        self._launch("kube-controller-manager", [
            f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}",
            f"--authorization-kubeconfig={kcm}", "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['kube-controller-manager']}", "--leader-elect=false",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}", "--use-service-account-credentials=true",
            "--controllers=*,-node-lifecycle-controller",
        ])
        self._launch("kube-scheduler", [
            f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}",
            f"--authorization-kubeconfig={sched}", "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['kube-scheduler']}", "--leader-elect=false",
        ])
        for name in ("kube-controller-manager", "kube-scheduler"):
            port = self.ports[name]
            self._wait_healthy(name, lambda port=port: self._get_text(  # type: ignore[misc]
                f"https://127.0.0.1:{port}/healthz", verify=False) == "ok", timeout=60)

    # --- clients --------------------------------------------------------------------------
    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
                stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The real kubectl against this control plane (admin unless ``kubeconfig`` is given).

        Its discovery cache lives in the work directory, so no test reads another run's."""
        cmd = [str(KUBECTL), f"--kubeconfig={kubeconfig or self.kubeconfig}",
               f"--cache-dir={self.workdir / 'kubectl-cache'}", *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n"
                                    f"{proc.stdout}{proc.stderr}")
        return proc

    def request(self, method: str, path: str, body: Any = None, *, token: str = ADMIN_TOKEN,
                content_type: str = "application/json") -> ApiResponse:
        """A raw API call; returns the status and decoded body rather than raising on 4xx."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ssl) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return ApiResponse(status, json.loads(raw) if raw else None)
        except ValueError:
            return ApiResponse(status, raw.decode(errors="replace"))

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """:meth:`request` that must succeed; returns the body."""
        resp = self.request(method, path, body, **kwargs)
        if not 200 <= resp.status < 300:
            raise ControlPlaneError(f"{method} {path} -> {resp.status}: {resp.body}")
        return resp.body

    def token_for(self, namespace: str, service_account: str, seconds: int = 3600) -> str:
        """A bound token for a ServiceAccount, issued by the API server (TokenRequest)."""
        body = self.ok("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/"
                       f"{service_account}/token",
                       {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {"expirationSeconds": seconds}})
        token: str = body["status"]["token"]
        return token

    def kubeconfig_for(self, namespace: str, service_account: str) -> tuple[Path, str]:
        token = self.token_for(namespace, service_account)
        path = self.workdir / f"{namespace}.{service_account}.kubeconfig"
        return self.write_kubeconfig(path, token, f"{namespace}:{service_account}"), token

    # --- objects a kubelet or an administrator would create ---------------------------------
    def create_namespace(self, name: str, timeout: float = 30) -> None:
        """Create a namespace and wait for its ``default`` ServiceAccount: the ServiceAccount
        admission plugin refuses pods in it until the controller-manager has made one."""
        self.ok("POST", "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_for(f"the default ServiceAccount in {name}", lambda: self.request(
            "GET", f"/api/v1/namespaces/{name}/serviceaccounts/default").status == 200,
            timeout)

    def add_node(self, name: str, labels: Mapping[str, str] | None = None,
                 taints: Sequence[Mapping[str, str]] = (),
                 allocatable: Mapping[str, str] | None = None) -> dict[str, Any]:
        """A Node object, Ready, with the given labels, taints and allocatable resources
        (capacity equals allocatable). The status is written through the status subresource,
        as a kubelet would, because a create ignores it."""
        resources = dict(allocatable or {"cpu": "8", "memory": "32Gi", "pods": "110"})
        self.ok("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                         "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"taints": [dict(t) for t in taints]},
        })
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        node: dict[str, Any] = self.ok(
            "PATCH", f"/api/v1/nodes/{name}/status",
            {"status": {"capacity": resources, "allocatable": resources, "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "set by the test", "lastHeartbeatTime": now,
                 "lastTransitionTime": now}]}},
            content_type="application/merge-patch+json")
        return node
