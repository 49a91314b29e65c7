"""One job's reconcile loop in the operator: observe, decide with the pure core, act.

One asyncio task per job (``JobWorker``) reconciles serially (never two passes of one job at
once) and coalesces bursts of events into one pass. The kopf handlers (``handlers.py``) only
wake it; it reads what they keep in memory through ``OperatorView``.

- A pass builds ``Observed`` from kopf's indices (plus this process's own writes the watch has
  not echoed yet, so a burst of creations does not turn into AlreadyExists storms), calls
  ``reconcile()`` in a thread (the event loop never waits on a decision), writes the status
  first (intent before action, so a crash between the two replays the same decision), then
  deletes, creates and posts Events. Creates treat 409 AlreadyExists as done and deletes treat
  404 as done; names are deterministic, so nothing is ever duplicated.
- Waiting: a worker sleeps until woken, or until the core's RequeueAfter (backoff expiry, hang
  deadline), or, only while Training, until the next progress scrape of rank 0's ``/metrics``.
  A job that nothing happens to costs no API request.

The status written is authoritative for this process: the operator is the only writer of a
job's status, so a worker keeps the status from its own last PATCH response instead of trusting
a possibly older body from the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from llamajob_trainer import protocol

from . import metrics, render
from .actions import CreateObject, Decision, DeletePods, EmitEvent
from .api import LlamaTrainingJobStatus
from .images import with_trainer_image
from .jobfile import JobFileError, parse_job
from .kube import ApiError, KubeClient
from .observed import NodeHealth, Observed, ObservedPod, Progress
from .plan import make_plan
from .progress import ScrapeError, metrics_url, scrape
from .reconcile import reconcile, reconcile_invalid

log = logging.getLogger("llamajob.operator")


@dataclass
class OperatorConfig:
    """Knobs of the shell; ``llamajob operator`` sets them from its command line."""

    progress_interval: float = 20.0  # seconds between scrapes of rank 0 while Training
    trainer_metrics_scheme: str = "http"
    trainer_metrics_port: int = protocol.DEFAULT_METRICS_PORT
    scrape_timeout: float = 5.0
    debounce: float = 0.01  # after a wake-up, let a burst of events land before deciding
    conflict_retry: float = 0.1  # after a 409 on a status write, when to decide again
    unseen_write_grace: float = 30.0  # how long our own writes count as seen without an echo
    api_concurrency: int = 32
    max_error_backoff: float = 60.0
    # Trainer family (images.TRAINER_FAMILIES) -> image, for jobs without spec.cluster.image
    # (`--trainer-image`). Empty: such jobs fail with InvalidSpec.
    trainer_images: Mapping[str, str] = field(default_factory=dict)


# --- what the indices hold ----------------------------------------------------------------
@dataclass(frozen=True)
class PodRecord:
    pod: ObservedPod
    failed_at: float | None  # epoch seconds Kubernetes reports for the pod's end, if any


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def failure_time(obj: Mapping[str, Any]) -> float | None:
    """When the pod ended, as Kubernetes recorded it: the trainer container's finishedAt, else
    the DisruptionTarget condition, else the Ready=False transition of a failed pod."""
    status = obj.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == render.CONTAINER:
            finished = ((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")
            if finished:
                return _epoch(finished)
    conditions = status.get("conditions") or []
    for cond in conditions:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return _epoch(cond.get("lastTransitionTime"))
    if status.get("phase") == "Failed":
        for cond in conditions:
            if cond.get("type") == "Ready" and cond.get("status") != "True":
                return _epoch(cond.get("lastTransitionTime"))
    return None


class OperatorView(Protocol):
    """What a worker needs from the operator-wide state (``handlers.Operator``)."""

    config: OperatorConfig

    def pods_of(self, namespace: str, label: str) -> Iterable[PodRecord]: ...
    def children_of(self, namespace: str, label: str) -> set[str]: ...
    def node_health(self, name: str) -> NodeHealth | None: ...
    def client(self) -> KubeClient: ...
    def http(self) -> aiohttp.ClientSession: ...
    def set_phase(self, namespace: str, name: str, phase: str | None) -> None: ...


@dataclass
class _FaultClock:
    seen_at: float  # monotonic
    attempt: int  # the attempt the fault ended


class JobWorker:
    """Reconciles one job, serially, whenever woken."""

    def __init__(self, operator: OperatorView, namespace: str, name: str) -> None:
        self.op = operator
        self.namespace = namespace
        self.name = name
        self.body: dict[str, Any] = {}
        self.uid: str | None = None
        self.generation: int | None = None
        self.written: dict[str, Any] | None = None  # status from our last PATCH response
        self.resource_version: str | None = None  # of the newest body or PATCH response
        self.progress: Progress | None = None
        self.progress_pod: str | None = None
        self.next_scrape = 0.0
        self.requeue_at: float | None = None
        self.created: dict[str, tuple[ObservedPod, float]] = {}
        self.created_children: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self.fault_clock: _FaultClock | None = None
        self.errors = 0
        self.warned_pruned = False
        self.woken_at: float | None = None
        self.stopped = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return render.label_value(self.name)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"llamajob {self.namespace}/"
                                             f"{self.name}")

    async def stop(self) -> None:
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def wake(self) -> None:
        if not self._wake.is_set():
            self.woken_at = time.monotonic()
            self._wake.set()

    def update(self, body: Mapping[str, Any]) -> bool:
        """A new body from the watch; True when it may change the decision."""
        meta = body.get("metadata") or {}
        uid, generation = meta.get("uid"), meta.get("generation")
        first = not self.body
        new_object = uid != self.uid
        self.body = copy.deepcopy(dict(body))
        self.resource_version = meta.get("resourceVersion")
        if new_object:
            # Recreated under the same name: nothing of the old object applies.
            self.uid, self.written, self.progress, self.progress_pod = uid, None, None, None
            self.created.clear()
            self.created_children.clear()
            self.deleted.clear()
            self.fault_clock = None
        changed = generation != self.generation or (body.get("status") or {}) != (
            self.written or {}
        )
        self.generation = generation
        return first or new_object or changed

    # --- the loop ---
    async def _run(self) -> None:
        self.wake()
        while True:
            timeout = self._timeout()
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if self.op.config.debounce > 0:
                await asyncio.sleep(self.op.config.debounce)
            if self.stopped:
                # Python 3.11's wait_for swallows a cancel that lands while the wake-up is
                # already set (a job deleted along with its pods): without this check the
                # worker would live on and recreate the deleted job's pods.
                return
            woken_at = self.woken_at or time.monotonic()
            self.woken_at = None
            self._wake.clear()
            try:
                await self.reconcile_once(woken_at)
                self.errors = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                delay = min(2.0 ** min(self.errors, 10), self.op.config.max_error_backoff)
                self.requeue_at = time.monotonic() + delay
                log.warning("%s/%s: reconcile failed (%s); retrying in %.0f s",
                            self.namespace, self.name, exc, delay)

    def _timeout(self) -> float | None:
        now = time.monotonic()
        if self.errors and self.requeue_at is not None:
            # Backing off after a failure (the API server away, say): the progress timer
            # waits too, or a training job would retry, and log, every progress interval.
            # A watch event still wakes the worker at once.
            return max(self.requeue_at - now, 0.0)
        times = []
        if self.requeue_at is not None:
            times.append(self.requeue_at - now)
        if self._phase() == "Training":
            times.append(self.next_scrape - now)
        return max(min(times), 0.0) if times else None

    def _phase(self) -> str | None:
        status = self.written if self.written is not None else self.body.get("status") or {}
        return status.get("phase")

    # --- observe ---
    def observe(self) -> tuple[Observed, list[PodRecord]]:
        op, now = self.op, time.monotonic()
        records = list(op.pods_of(self.namespace, self.label))
        seen = {r.pod.name for r in records}
        grace = op.config.unseen_write_grace
        self.created = {
            n: v for n, v in self.created.items() if n not in seen and now - v[1] < grace
        }
        self.deleted = {n: t for n, t in self.deleted.items() if n in seen and now - t < grace}
        pods: dict[str, ObservedPod] = {}
        for r in records:
            deleted = r.pod.name in self.deleted
            pods[r.pod.name] = replace(r.pod, deleting=True) if deleted else r.pod
        for name, (pod, _) in self.created.items():
            pods.setdefault(name, pod)
        children = op.children_of(self.namespace, self.label)
        self.created_children = {
            n: t for n, t in self.created_children.items() if n not in children and now - t < grace
        }
        present = children | set(self.created_children)
        nodes: dict[str, NodeHealth] = {}
        for pod in pods.values():
            if pod.node and pod.node not in nodes:
                health = op.node_health(pod.node)
                if health is not None:
                    nodes[pod.node] = health
        observed = Observed(
            pods=tuple(sorted(pods.values(), key=lambda p: (p.role, p.attempt, p.rank))),
            nodes=nodes,
            progress=self.progress,
            service=render.service_name(self.name) in present,
            configmaps=frozenset(present - {render.service_name(self.name)}),
        )
        return observed, records

    # --- progress ---
    async def maybe_scrape(self, observed: Observed, status: Mapping[str, Any]) -> None:
        if status.get("phase") != "Training":
            return
        now = time.monotonic()
        if now < self.next_scrape:
            return
        self.next_scrape = now + self.op.config.progress_interval
        attempt = status.get("attempt")
        rank0 = next(
            (p for p in observed.pods
             if p.role == render.ROLE_TRAIN and p.attempt == attempt and p.rank == 0),
            None,
        )
        if rank0 is None or not rank0.ip or rank0.phase != "Running":
            return
        if rank0.name != self.progress_pod:
            self.progress, self.progress_pod = None, rank0.name  # a new gang starts over
        cfg = self.op.config
        url = metrics_url(rank0.ip, scheme=cfg.trainer_metrics_scheme,
                          port=cfg.trainer_metrics_port)
        try:
            result = await scrape(self.op.http(), url, now=datetime.now(UTC), job=self.name,
                                  namespace=self.namespace, timeout=cfg.scrape_timeout)
        except ScrapeError as exc:
            log.debug("%s/%s: no progress: %s", self.namespace, self.name, exc)
            return
        if result is not None:
            self.progress = result

    # --- decide and act ---
    async def reconcile_once(self, woken_at: float) -> None:
        if not self.body or (self.body.get("metadata") or {}).get("deletionTimestamp"):
            # Being deleted (another controller's finalizer, or foreground deletion collecting
            # the children first): recreating children now would fight the garbage collector.
            return
        started = time.perf_counter()
        observed, records = self.observe()
        prior = self.written if self.written is not None else dict(self.body.get("status") or {})
        # The version this decision reads: the watch may bring a newer body while it runs.
        read_version = self.resource_version
        await self.maybe_scrape(observed, prior)
        observed = replace(observed, progress=self.progress)
        # The core is pure but not always quick (a spec of absurd numbers costs the planner
        # more); in a thread it never holds up the watches, the other jobs or /healthz.
        decision = await asyncio.to_thread(
            decide, self.body, observed, prior, datetime.now(UTC), self.name, self.namespace,
            self.op.config.trainer_images,
        )
        if self.stopped:
            return  # deleted while the thread ran: act on nothing for a gone job
        new = decision.status.model_dump(by_alias=True, exclude_none=True, mode="json")
        old_status = parse_status(prior)

        patch = merge_diff(prior, new)
        if patch:
            try:
                response = await self.op.client().patch_status(
                    self.namespace, self.name, patch, read_version)
            except ApiError as exc:
                if exc.status == 404:
                    return  # deleted meanwhile; the DELETED event stops this worker
                if exc.status == 409:
                    # Someone else wrote the job (a user's edit, another replica) after the
                    # version this decision read. Nothing was acted on yet (status goes
                    # first): decide again from the stored object, which the watch brings;
                    # the requeue covers an event that arrived before this write.
                    log.info("%s/%s: the job changed while deciding; deciding again",
                             self.namespace, self.name)
                    metrics.STATUS_CONFLICTS.inc()
                    self.written = None
                    self.requeue_at = time.monotonic() + self.op.config.conflict_retry
                    return
                metrics.API_ERRORS.inc()
                raise
            self.written = dict((response or {}).get("status") or new)
            self.resource_version = ((response or {}).get("metadata") or {}).get(
                "resourceVersion", self.resource_version)
            dropped = merge_diff(self.written, new)
            if dropped and not self.warned_pruned:
                # The API server pruned fields its CRD schema does not know: an operator newer
                # than the installed CRD. Progress is lost on restart until the CRD is upgraded.
                self.warned_pruned = True
                log.warning("%s/%s: the API server dropped status fields %s; upgrade the CRD",
                            self.namespace, self.name, sorted(dropped))
        elif self.written is None:
            self.written = dict(prior)
        await self.apply(decision)
        self.account(old_status, decision.status, records, woken_at)
        self.requeue_at = (
            time.monotonic() + decision.requeue_after if decision.requeue_after is not None
            else None
        )
        metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)

    async def apply(self, decision: Decision) -> None:
        client = self.op.client()
        deletes = [
            (n, a.grace_seconds)
            for a in decision.actions if isinstance(a, DeletePods) for n in a.names
        ]
        creates = [a for a in decision.actions if isinstance(a, CreateObject)]
        events = [a for a in decision.actions if isinstance(a, EmitEvent)]
        failures: list[BaseException] = []

        async def delete(name: str, grace_seconds: int | None) -> None:
            try:
                await client.delete("Pod", self.namespace, name, grace_seconds)
            except ApiError as exc:
                if exc.status != 404:
                    metrics.API_ERRORS.inc()
                    failures.append(exc)
                    return
            self.deleted[name] = time.monotonic()

        async def create(action: CreateObject) -> None:
            try:
                await client.create(action.manifest)
                if action.kind == "Pod":
                    metrics.PODS_CREATED.inc()
            except ApiError as exc:
                if exc.status != 409:
                    metrics.API_ERRORS.inc()
                    failures.append(exc)
                    return
            stamp = time.monotonic()
            if action.kind == "Pod":
                pod = ObservedPod(action.name, action.role or "", action.attempt or 0,
                                  action.rank if action.rank is not None else -1, "Pending")
                self.created[action.name] = (pod, stamp)
            else:
                self.created_children[action.name] = stamp

        await asyncio.gather(*(delete(n, grace) for n, grace in deletes))
        # Config and Service before the pods that mount and resolve them.
        children = [a for a in creates if a.kind != "Pod"]
        await asyncio.gather(*(create(a) for a in children))
        await asyncio.gather(*(create(a) for a in creates if a.kind == "Pod"))
        for event in events:
            try:
                await client.post_event(self.body, event.type, event.reason, event.message)
            except ApiError as exc:
                metrics.API_ERRORS.inc()
                log.warning("%s/%s: cannot post Event %s: %s", self.namespace, self.name,
                            event.reason, exc)
        for event in events:
            log.info("%s/%s: %s: %s", self.namespace, self.name, event.reason, event.message)
        if failures:
            raise failures[0]

    # --- metrics ---
    def account(
        self,
        old: LlamaTrainingJobStatus,
        new: LlamaTrainingJobStatus,
        records: Iterable[PodRecord],
        woken_at: float,
    ) -> None:
        if new.restarts > old.restarts:
            metrics.JOB_RESTARTS.labels(job=self.name, namespace=self.namespace).inc(
                new.restarts - old.restarts
            )
        known = {(f.attempt, f.pod, f.reason, f.time) for f in old.faults}
        fresh = [f for f in new.faults if (f.attempt, f.pod, f.reason, f.time) not in known]
        if fresh:
            failed_at = {r.pod.name: r.failed_at for r in records}
            delay = time.monotonic() - woken_at
            for f in fresh:
                when = failed_at.get(f.pod)
                if when is not None:
                    # Seen when woken; Kubernetes' clock has whole seconds, never negative here.
                    metrics.FAULT_DETECTION.observe(max(time.time() - delay - when, 0.0))
            if new.phase == "Restarting" and self.fault_clock is None:
                self.fault_clock = _FaultClock(seen_at=woken_at, attempt=max(f.attempt for f in
                                                                              fresh))
        if self.fault_clock is not None:
            if new.phase in ("Succeeded", "Failed"):
                self.fault_clock = None
            elif new.attempt > self.fault_clock.attempt and self._gang_created(new):
                metrics.RESTART_LATENCY.observe(time.monotonic() - self.fault_clock.seen_at)
                self.fault_clock = None
        self.op.set_phase(self.namespace, self.name, new.phase)

    def _gang_created(self, status: LlamaTrainingJobStatus) -> bool:
        role = render.ROLE_COMPILE if status.phase == "Compiling" else render.ROLE_TRAIN
        want = status.pods or 0
        have = {
            p.rank for p in self.observe()[0].pods if p.role == role and p.attempt == status.attempt
        }
        return want > 0 and have >= set(range(want))


def decide(
    body: Mapping[str, Any],
    observed: Observed,
    prior: Mapping[str, Any],
    now: datetime,
    name: str,
    namespace: str,
    trainer_images: Mapping[str, str] | None = None,
) -> Decision:
    """The pure core on one job's body as the watch delivered it. Reads only its arguments (a
    worker replaces its body on update, never mutates it), so it runs in a thread.

    A job without ``spec.cluster.image`` gets the operator's image of its trainer family
    (``trainer_images``) before anything is planned, so the pods, the spec revision and the
    compile key all use the image the pods run; with no such image it fails (InvalidSpec)."""
    status = parse_status(prior)
    meta = body.get("metadata") or {}
    try:
        job = parse_job(body)
        job, missing = with_trainer_image(job, trainer_images or {})
    except JobFileError as exc:
        return reconcile_invalid(name, exc.errors, status, observed=observed, now=now,
                                 namespace=namespace, generation=meta.get("generation"))
    if missing is not None:
        problems = [*make_plan(job.spec).problems(), missing]
        return reconcile_invalid(name, problems, status, observed=observed, now=now,
                                 namespace=namespace, generation=meta.get("generation"))
    job = job.model_copy(update={"status": status})
    return reconcile(job, observed, now)


def parse_status(raw: Mapping[str, Any] | None) -> LlamaTrainingJobStatus:
    return LlamaTrainingJobStatus.model_validate(dict(raw or {}))


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning old into new: changed keys, nested objects recursed, lists
    replaced whole, removed keys as null."""
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        if key not in new:
            patch[key] = None
        elif key not in old:
            patch[key] = new[key]
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            sub = merge_diff(old[key], new[key])
            if sub:
                patch[key] = sub
        elif old[key] != new[key]:
            patch[key] = new[key]
    return patch
