"""The kopf shell: watch jobs, their pods and nodes, and wake the right job's worker.

How it is wired (level-triggered, one reconcile function for everything):

- kopf *indices* keep what the core needs in memory, fed by watches: the job's pods (by the
  ``llamajob.dev/job`` label, also filtered server-side), its Service and ConfigMap, and the
  health of every node. kopf fills them completely before any handler runs, so a restarted
  operator decides from the whole picture, never from half a list.
- Every event on a job, on one of its pods or children, and every node health change for a
  node hosting its pods wakes that job's *worker* (``worker.py``: one asyncio task per job that
  observes, runs the pure core and carries out its decision). ``Operator`` holds the
  operator-wide state the workers read: the indices, the API client, the phases for metrics.
- Deleting a job: Kubernetes' garbage collector deletes its children through their
  ownerReferences (the operator adds no finalizer, so jobs stay deletable while the operator
  is down); the worker stops, and does nothing while a deletion is pending. (The test
  emulator has no garbage collector of its own; its realism layer emulates this one.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import kopf

from . import metrics, render
from .api import GROUP, KIND, PLURAL, VERSION
from .kube import KubeClient
from .observed import NodeHealth
from .worker import JobWorker, OperatorConfig, PodRecord, failure_time

log = logging.getLogger("llamajob.operator")

CONFIG = OperatorConfig()


def _owner(meta: Mapping[str, Any]) -> str | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(GROUP + "/"):
            return str(ref.get("name"))
    return None



# --- operator-wide state --------------------------------------------------------------------
@dataclass
class Operator:
    config: OperatorConfig = field(default_factory=OperatorConfig)
    credentials: kopf.ConnectionInfo | None = None
    workers: dict[tuple[str, str], JobWorker] = field(default_factory=dict)
    phases: dict[tuple[str, str], str] = field(default_factory=dict)
    node_states: dict[str, NodeHealth] = field(default_factory=dict)
    seen_nodes: set[str] = field(default_factory=set)
    pods_index: Any = None
    nodes_index: Any = None
    children_index: Any = None
    _client: KubeClient | None = None
    _http: aiohttp.ClientSession | None = None

    def bind_indices(self, kwargs: Mapping[str, Any]) -> None:
        self.pods_index = kwargs.get("pods_by_job", self.pods_index)
        self.nodes_index = kwargs.get("node_health_index", self.nodes_index)
        self.children_index = kwargs.get("children_by_job", self.children_index)

    def pods_of(self, namespace: str, label: str) -> Iterable[PodRecord]:
        if self.pods_index is None or (namespace, label) not in self.pods_index:
            return ()
        return list(self.pods_index[(namespace, label)])

    def children_of(self, namespace: str, label: str) -> set[str]:
        if self.children_index is None or (namespace, label) not in self.children_index:
            return set()
        return set(self.children_index[(namespace, label)])

    def node_health(self, name: str) -> NodeHealth | None:
        """Health of a node; None (unknown, judged healthy) for a node never seen by this
        process: a pod may be bound to a node whose watch event has not arrived yet."""
        if self.nodes_index is not None and name in self.nodes_index:
            for health in self.nodes_index[name]:
                return health  # type: ignore[no-any-return]
        if name in self.seen_nodes:
            return render.node_health(name, None)
        return None

    def client(self) -> KubeClient:
        if self._client is None:
            if self.credentials is None:
                raise RuntimeError("no Kubernetes credentials yet (kopf login has not run)")
            self._client = KubeClient(
                self.credentials, relogin=_relogin, concurrency=self.config.api_concurrency
            )
        return self._client

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16))
        return self._http

    def worker(self, namespace: str, name: str) -> JobWorker:
        key = (namespace, name)
        if key not in self.workers:
            self.workers[key] = JobWorker(self, namespace, name)
        return self.workers[key]

    async def forget(self, namespace: str, name: str) -> None:
        worker = self.workers.pop((namespace, name), None)
        if worker is not None:
            await worker.stop()
        metrics.forget_job_info(namespace, name, self.phases.pop((namespace, name), None))
        with contextlib.suppress(KeyError):
            metrics.JOB_RESTARTS.remove(name, namespace)
        metrics.set_job_phases((ns, phase) for (ns, _), phase in self.phases.items())

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        if phase and self.phases.get((namespace, name)) != phase:
            metrics.set_job_info(namespace, name, phase, self.phases.get((namespace, name)))
            self.phases[(namespace, name)] = phase
            metrics.set_job_phases((ns, p) for (ns, _), p in self.phases.items())

    def wake_job(self, namespace: str, name: str | None) -> None:
        if name and (namespace, name) in self.workers:
            self.workers[(namespace, name)].wake()

    def wake_label(self, namespace: str, label: str) -> None:
        for (ns, _), worker in self.workers.items():
            if ns == namespace and worker.label == label:
                worker.wake()

    async def close(self) -> None:
        for key in list(self.workers):
            await self.forget(*key)
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._http is not None:
            await self._http.close()
            self._http = None


OPERATOR = Operator()


def _relogin() -> kopf.ConnectionInfo | None:
    return _login_now(kopf.OperatorSettings())


def _login_now(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """The in-cluster service account first; then, when the official `kubernetes` client is
    installed, its kubeconfig loader (which runs exec plugins such as `aws eks get-token`);
    then kopf's own kubeconfig reader (tokens, client certificates, basic auth)."""
    info = kopf.login_with_service_account(settings=settings)
    if info is None and importlib.util.find_spec("kubernetes") is not None:
        with contextlib.suppress(Exception):
            info = kopf.login_via_client(settings=settings, logger=log)
    if info is None:
        info = kopf.login_with_kubeconfig(settings=settings)
    return info


# --- kopf registrations ---------------------------------------------------------------------
class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf computes a "diff base" (a deep copy of the body) for every event, for change
    handlers (on.create/update/field). This operator has none; level-triggered, it compares
    nothing with a previous body. Skipping the copy saves a good part of kopf's per-event CPU
    with thousands of pods and nodes."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})


JOB_RESOURCE = (GROUP, VERSION, PLURAL)
HAS_JOB_LABEL = {render.LABEL_JOB: kopf.PRESENT}


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global OPERATOR
    await OPERATOR.close()
    OPERATOR = Operator(config=CONFIG, credentials=OPERATOR.credentials)
    # Let the API server filter: only our children reach this process, not every pod and
    # ConfigMap of the cluster.
    for plural in ("pods", "services", "configmaps"):
        settings.watching.label_selectors["v1", plural] = render.LABEL_JOB
    settings.persistence.diffbase_storage = _NoDiffBase()
    # Events are posted explicitly by the workers; kopf's own postings are for its problems.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "llamajob-operator"


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    await OPERATOR.close()


@kopf.on.login()
def _login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    info = _login_now(settings)
    if info is not None:
        OPERATOR.credentials = info
    return info


@kopf.index("v1", "pods", labels=HAS_JOB_LABEL)
def pods_by_job(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> Any:
    pod = render.observed_pod(body)
    if pod is None:
        return None
    return {(namespace, labels[render.LABEL_JOB]): PodRecord(pod, failure_time(body))}


@kopf.index("v1", "services", labels=HAS_JOB_LABEL)
def _services_by_job(name: str, namespace: str, labels: kopf.Labels, **_: Any) -> Any:
    return {(namespace, labels[render.LABEL_JOB]): name}


@kopf.index("v1", "configmaps", labels=HAS_JOB_LABEL)
def _configmaps_by_job(name: str, namespace: str, labels: kopf.Labels, **_: Any) -> Any:
    return {(namespace, labels[render.LABEL_JOB]): name}


@kopf.index("v1", "nodes")
def node_health_index(name: str, body: kopf.Body, **_: Any) -> Any:
    return {name: render.node_health(name, body)}


class _ChildrenIndex:
    """Services and ConfigMaps of a job, from their two indices."""

    def __init__(self, services: Any, configmaps: Any) -> None:
        self.services, self.configmaps = services, configmaps

    def __contains__(self, key: object) -> bool:
        return key in self.services or key in self.configmaps

    def __getitem__(self, key: Any) -> set[str]:
        out: set[str] = set()
        for index in (self.services, self.configmaps):
            if key in index:
                out.update(index[key])
        return out


def _bind(kwargs: Mapping[str, Any]) -> None:
    if "_services_by_job" in kwargs and "_configmaps_by_job" in kwargs:
        kwargs = {**kwargs, "children_by_job": _ChildrenIndex(kwargs["_services_by_job"],
                                                              kwargs["_configmaps_by_job"])}
    OPERATOR.bind_indices(kwargs)


@kopf.on.event(*JOB_RESOURCE)
async def job_event(event: Mapping[str, Any], namespace: str, name: str, **kwargs: Any) -> None:
    _bind(kwargs)
    if event.get("type") == "DELETED":
        await OPERATOR.forget(namespace, name)
        return
    worker = OPERATOR.worker(namespace, name)
    if worker.update(event["object"]):
        worker.start()
        worker.wake()


@kopf.on.event("v1", "pods", labels=HAS_JOB_LABEL)
async def pod_event(meta: Mapping[str, Any], namespace: str, labels: kopf.Labels,
                    **kwargs: Any) -> None:
    _bind(kwargs)
    owner = _owner(meta)
    if owner is not None:
        OPERATOR.wake_job(namespace, owner)
    else:
        OPERATOR.wake_label(namespace, labels[render.LABEL_JOB])


@kopf.on.event("v1", "services", labels=HAS_JOB_LABEL)
@kopf.on.event("v1", "configmaps", labels=HAS_JOB_LABEL)
async def child_event(event: Mapping[str, Any], meta: Mapping[str, Any], namespace: str,
                      **kwargs: Any) -> None:
    _bind(kwargs)
    if event.get("type") == "DELETED":  # only a vanished child changes a decision
        OPERATOR.wake_job(namespace, _owner(meta))


@kopf.on.event("v1", "nodes")
async def node_event(event: Mapping[str, Any], name: str, body: kopf.Body,
                     **kwargs: Any) -> None:
    _bind(kwargs)
    gone = event.get("type") == "DELETED"
    health = render.node_health(name, None if gone else body)
    OPERATOR.seen_nodes.add(name)
    if OPERATOR.node_states.get(name) == health:
        return
    OPERATOR.node_states[name] = health
    if gone:
        OPERATOR.node_states.pop(name, None)
    # Wake the jobs with a pod on this node (the pods index knows where each pod runs).
    index = OPERATOR.pods_index
    if index is None:
        return
    for key in list(index):
        for record in index[key]:
            if record.pod.node == name:
                OPERATOR.wake_label(*key)
                break
