"""A Kubernetes API for tests: kmock's KubernetesEmulator plus a small realism layer.

kmock 0.8 provides the HTTP server, request parsing, the request log, an object store, API
discovery and its reaction DSL. Its emulator is deliberately naive, so this layer adds what an
operator and ``kubectl`` rely on, and nothing else:

- metadata on create: ``uid``, ``resourceVersion`` (one global counter, as etcd has),
  ``creationTimestamp``, ``generation``, ``generateName``, the namespace from the URL; 409
  AlreadyExists; new pods get ``status.phase: Pending``; a custom resource's status is dropped.
- writes: JSON merge patches (RFC 7386) and JSON patches; strategic-merge patches are treated as
  merge patches (lists are replaced, not merged) and, like other content types, refused (415)
  for custom resources. ``resourceVersion`` moves on every real change, ``generation`` when
  anything outside metadata and status changes; a no-op patch changes nothing and notifies
  nobody, as on a real API server.
- custom resources are pruned to their CRD's structural schema (unknown fields are dropped, or
  rejected with ``fieldValidation=Strict`` as kubectl sends) and validated against it.
- the status subresource: writes to ``/status`` change only ``.status``; writes to the object
  keep the old ``.status`` (for resources declared with a status subresource).
- lists: ``kind: XList``, ``apiVersion`` and ``metadata.resourceVersion``; label selectors
  (``=``, ``==``, ``!=``, ``in``, ``notin``, exists, ``!`` not-exists) and field selectors
  (``=``, ``==``, ``!=`` on any dotted path such as ``metadata.name`` or ``status.phase``).
- watches: ``application/json`` content type; resuming from a ``resourceVersion`` (replaying
  the log since then, or ``410 Gone`` once it is compacted) instead of replaying everything;
  selectors, with objects entering or leaving a selector seen as ADDED or DELETED;
  ``timeoutSeconds``; periodic BOOKMARKs; ``sendInitialEvents``.
- server-side printing: ``Table`` responses for ``kubectl get``, with a CRD's
  ``additionalPrinterColumns`` (priority, ``date`` columns as ages).
- discovery for installed CRDs (kind, short names, categories, status subresource), for the
  core resources registered here (with the core group's ``groupVersion: v1``, which kmock
  writes as ``/v1``), and the OpenAPI v3 entries kubectl reads to decide that the server
  validates fields itself; ``/api/v1/namespaces`` read as the namespaces resource, not as a
  namespace prefix.
- speed: the API verbs are answered directly instead of through kmock's reaction matching
  (tens of milliseconds a request); ``use_reactions=True`` restores kmock's DSL.
- garbage collection: deleting an object deletes its dependents (``ownerReferences`` by uid,
  background propagation; ``propagationPolicy: Orphan`` keeps them); finalizers are respected
  (``deletionTimestamp`` first, removal when the last finalizer goes).
- housekeeping: the request log can be cleared, and object history is bounded.

Not emulated: admission webhooks, schema defaulting and CEL rules, RBAC (the request log lets
tests compare what was called with the operator's declared permissions), scheduling and running
pods (tests play the kubelet by patching pod status), graceful pod termination (a delete removes
a pod at once), PUT, deletecollection and server-side apply.

The emulator runs in its own thread and event loop (``EmulatorThread``) so that tests can be
plain synchronous code driving ``kubectl`` subprocesses, a ``kopf.testing.KopfRunner`` thread
and the test client at the same time (``kube_cluster.py``: client, kubelet, fixtures).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import json
import logging
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
import yaml
from kmock._internal import apps, enums, k8s, parsing, rendering

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "llamatrainingjobs.llamajob.dev.yaml"
KUBECTL = Path(sys.executable).parent / "kubectl"

# (group/version/plural, kind, namespaced, short names, subresources)
CORE_RESOURCES: tuple[tuple[str, str, bool, tuple[str, ...], tuple[str, ...]], ...] = (
    ("v1/pods", "Pod", True, ("po",), ("status",)),
    ("v1/services", "Service", True, ("svc",), ("status",)),
    ("v1/configmaps", "ConfigMap", True, ("cm",), ()),
    ("v1/events", "Event", True, ("ev",), ()),
    ("v1/nodes", "Node", False, ("no",), ("status",)),
    ("v1/namespaces", "Namespace", False, ("ns",), ("status",)),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False,
     ("crd", "crds"), ("status",)),
)
VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


def now_iso() -> str:
    """Kubernetes timestamps: RFC 3339, UTC, whole seconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def human_age(seconds: float) -> str:
    """Roughly what the API server prints in a ``date`` column."""
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 10:
        return f"{m}m{s}s" if s else f"{m}m"
    if m < 180:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 8:
        return f"{h}h{m}m" if m else f"{h}h"
    if h < 48:
        return f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if d < 8 and h else f"{d}d"


# --- URL parsing -------------------------------------------------------------------------------
_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock reads /api/v1/namespaces[/NAME] as a namespace prefix; here it is the resource."""
    parts = path.strip("/").split("/")
    after = parts[3:] if parts[:1] == ["apis"] else parts[2:]
    if after[:1] == ["namespaces"] and (len(after) <= 2 or after[2] in {"status", "finalize"}):
        group = "" if parts[0] == "api" else parts[1]
        version = parts[1] if parts[0] == "api" else parts[2]
        return parsing.ParsedPath(
            group=group,
            version=version,
            plural="namespaces",
            name=after[1] if len(after) > 1 else None,
            subresource=after[2] if len(after) > 2 else None,
        )
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path
# One access-log line per request of the emulator drowns a failing test's output.
logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# --- selectors ----------------------------------------------------------------------------------
_SET_RE = re.compile(r"^\s*([^\s!=,()]+)\s+(in|notin)\s*\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([^\s!=,()]+)\s*(==|=|!=)\s*([^\s,()]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([^\s!=,()]+)\s*$")


def _split_requirements(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p.strip()]


def label_matcher(text: str | None) -> Callable[[Mapping[str, str]], bool]:
    if not text:
        return lambda labels: True
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for req in _split_requirements(text):
        if m := _SET_RE.match(req):
            key, op, raw = m.groups()
            values = {v.strip() for v in raw.split(",") if v.strip()}
            if op == "in":
                checks.append(lambda ls, k=key, vs=values: ls.get(k) in vs)
            else:
                checks.append(lambda ls, k=key, vs=values: ls.get(k) not in vs)
        elif m := _EQ_RE.match(req):
            key, op, value = m.groups()
            if op == "!=":
                checks.append(lambda ls, k=key, v=value: ls.get(k) != v)
            else:
                checks.append(lambda ls, k=key, v=value: ls.get(k) == v)
        elif m := _EXISTS_RE.match(req):
            neg, key = m.groups()
            if neg:
                checks.append(lambda ls, k=key: k not in ls)
            else:
                checks.append(lambda ls, k=key: k in ls)
        else:
            raise k8s.KubernetesError(400, "BadRequest", f"unable to parse requirement: {req!r}")
    return lambda labels: all(check(labels) for check in checks)


def _dotted(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def field_matcher(text: str | None) -> Callable[[Mapping[str, Any]], bool]:
    if not text:
        return lambda obj: True
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for req in _split_requirements(text):
        m = _EQ_RE.match(req)
        if not m:
            raise k8s.KubernetesError(400, "BadRequest", f"invalid field selector: {req!r}")
        path, op, value = m.groups()
        if op == "!=":
            checks.append(lambda o, p=path, v=value: _dotted(o, p) != v)
        else:
            checks.append(lambda o, p=path, v=value: _dotted(o, p) == v)
    return lambda obj: all(check(obj) for check in checks)


# --- the emulator -------------------------------------------------------------------------------
Key = tuple[kmock.resource, str | None, str]


@dataclass
class _Watcher:
    namespace: str | None
    name: str | None
    labels: Callable[[Mapping[str, str]], bool]
    fields: Callable[[Mapping[str, Any]], bool]
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    def sees(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.name is not None and meta.get("name") != self.name:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)

    def translate(
        self, kind: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """One change as this watcher sees it: crossing its selector is ADDED or DELETED."""
        was, now = self.sees(old), self.sees(new)
        if kind == "DELETED":
            return {"type": "DELETED", "object": new} if was or now else None
        if was and now:
            return {"type": "MODIFIED", "object": new}
        if now:
            return {"type": "ADDED", "object": new}
        if was:
            return {"type": "DELETED", "object": new}
        return None


@attrs.define(kw_only=True)
class Emulator(k8s.KubernetesEmulator):
    """kmock's emulator with the realism layer described in the module docstring."""

    bookmark_interval: float = 60.0
    use_reactions: bool = False  # route API verbs through kmock's reactions (slow, scriptable)
    record_writes: bool = False  # keep (monotonic time, event, plural, namespace, name) per write
    writes: list[tuple[float, str, str, str | None, str]] = attrs.field(factory=list, init=False)
    history_limit: int = 2
    event_log_limit: int = 200_000
    _rv: int = attrs.field(default=1000, init=False)
    _log: dict[kmock.resource, collections.deque[tuple[int, str, Any, Any]]] = attrs.field(
        factory=dict, init=False
    )
    _compacted: dict[kmock.resource, int] = attrs.field(factory=dict, init=False)
    _watchers: dict[kmock.resource, set[int]] = attrs.field(factory=dict, init=False)
    _watcher_objs: dict[int, _Watcher] = attrs.field(factory=dict, init=False)
    _results: dict[int, Any] = attrs.field(factory=dict, init=False)
    _printer_columns: dict[kmock.resource, list[dict[str, Any]]] = attrs.field(
        factory=dict, init=False
    )
    _schemas: dict[kmock.resource, dict[str, Any]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/apis/.+")] << self._serve_openapi_gv
        for path, kind, namespaced, short, subs in CORE_RESOURCES:
            self.resources[path] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                verbs=VERBS,
                shortnames=set(short),
                subresources=set(subs),
            )

    # --- setup helpers (call from the emulator's loop or before serving) ---
    def install_crd(self, crd: Mapping[str, Any]) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            res = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs=VERBS,
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(version.get("subresources", {})),
            )
            self._printer_columns[res] = list(version.get("additionalPrinterColumns", []))
            schema = version.get("schema", {}).get("openAPIV3Schema")
            if schema:
                self._schemas[res] = schema
        crds = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        self.put_object(crds, dict(crd))

    def put_object(self, res: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object directly (as if by an admin), with full metadata and a watch event."""
        namespace = obj.get("metadata", {}).get("namespace") if self._namespaced(res) else None
        return self._create(res, namespace, copy.deepcopy(obj))

    def patch_object(self, res: kmock.resource, namespace: str | None, name: str,
                     patch: dict[str, Any], sub: str | None = None) -> dict[str, Any]:
        """Merge-patch an object directly (as the kubelet would through the API), with events."""
        request = rendering.Request(method="PATCH", action=enums.action.UPDATE, resource=res,
                                    namespace=namespace, name=name, subresource=sub, data=patch,
                                    headers={"Content-Type": "application/merge-patch+json"})
        return self._patch(request)

    def clear_requests(self) -> None:
        self._requests.clear()
        with contextlib.suppress(RuntimeError):
            self.errors.clear()

    @property
    def resource_version(self) -> int:
        return self._rv

    def live(self, res: kmock.resource) -> Iterator[tuple[Key, dict[str, Any]]]:
        for key, obj in list(self._objects.items()):
            if key[0] == res and not obj.deleted:
                yield key, obj.last.raw

    # kubectl asks whether the server validates fields itself (it then sends
    # fieldValidation=Strict and skips client-side checks); the answer is yes for installed CRDs.
    def _serve_openapi_root(self, request: rendering.Request) -> rendering.Payload:
        paths = {
            f"apis/{res.group}/{res.version}": {
                "serverRelativeURL": f"/openapi/v3/apis/{res.group}/{res.version}"
            }
            for res in self._printer_columns
        }
        return {"paths": paths}

    def _serve_openapi_gv(self, request: rendering.Request) -> rendering.Payload:
        paths: dict[str, Any] = {}
        for res, _ in self._printer_columns.items():
            if request.url.path != f"/openapi/v3/apis/{res.group}/{res.version}":
                continue
            gvk = {"group": res.group, "version": res.version, "kind": self._kind(res)}
            param = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
            op = {"x-kubernetes-group-version-kind": gvk, "parameters": [param],
                  "responses": {"200": {"description": "OK"}}}
            base = f"/apis/{res.group}/{res.version}/namespaces/{{namespace}}/{res.plural}"
            paths[base] = {"post": op}
            paths[base + "/{name}"] = {"patch": op}
        if not paths:
            raise k8s.KubernetesNotFoundError()
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "emulated"},
                "paths": paths, "components": {"schemas": {}}}

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        served: Any = await super()._serve_version(request)
        served["groupVersion"] = served["groupVersion"].lstrip("/")  # the core group is "v1"
        for entry in served.get("resources", []):
            if "/" in entry["name"]:  # a subresource has no short names or categories of its own
                entry["shortNames"] = []
                entry["categories"] = []
                entry["verbs"] = ["get", "patch", "update"]
        return served

    # --- request dispatch ---
    async def _handle(self, request: rendering.Request) -> Any:
        action = request.action
        if request.resource is not None and request.params.get("dryRun") is None:
            if action == enums.action.CREATE and request.subresource is None:
                body = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
                if body is None:
                    raise k8s.KubernetesError(400, "BadRequest", "the body must be an object")
                self._results[id(request)] = self._create(
                    request.resource, request.namespace, body,
                    request.params.get("fieldValidation", ""),
                )
            elif action == enums.action.UPDATE:
                self._results[id(request)] = self._patch(request)
            elif action == enums.action.DELETE:
                options = request.data if isinstance(request.data, dict) else {}
                policy = options.get("propagationPolicy") or request.params.get(
                    "propagationPolicy"
                )
                self._results[id(request)] = self._delete(
                    request.resource, request.namespace, request.name or "",
                    orphan=policy == "Orphan",
                )
        try:
            api_verb = request.resource is not None and request.resource.plural and action
            if self.use_reactions or not api_verb:
                # kmock's reaction DSL (user reactions, then the fallbacks). Skips
                # KubernetesEmulator._handle and its naive writes.
                return await apps.RawHandler._handle(self, request)
            return await self._respond(request)
        finally:
            self._results.pop(id(request), None)

    async def _respond(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """Answer the API verbs directly: kmock matches every request against every reaction,
        which costs tens of milliseconds a request and would dominate the operator's timings."""
        action = request.action
        if action == enums.action.CREATE:
            return aiohttp.web.json_response(self._results[id(request)], status=201)
        if action in (enums.action.UPDATE, enums.action.DELETE):
            return aiohttp.web.json_response(self._results[id(request)])
        if action == enums.action.LIST:
            return aiohttp.web.json_response(await self._serve_list(request))
        if action == enums.action.FETCH:
            return aiohttp.web.json_response(await self._serve_fetch(request))
        assert action == enums.action.WATCH and request._raw_request is not None
        self._known(request.resource)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        with contextlib.suppress(ConnectionError):
            async for event in self._watch(request):
                if event != b"":
                    await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        return response

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        return rendering.Response(status=201, payload=self._results[id(request)])

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        return self._results[id(request)]

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        return self._results[id(request)]

    # --- writes (synchronous: atomic within the event loop, so no lock is needed) ---
    def _namespaced(self, res: kmock.resource) -> bool:
        return res in self.resources and bool(self.resources[res].namespaced)

    def _has_status(self, res: kmock.resource) -> bool:
        return res in self.resources and "status" in self.resources[res].subresources

    def _is_custom(self, res: kmock.resource) -> bool:
        return res in self._printer_columns

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _store(self, key: Key, obj: dict[str, Any] | None) -> None:
        if key not in self._objects:
            self._objects[key] = obj if obj is not None else {}
            if obj is None:
                self._objects[key].delete()
        elif obj is None:
            self._objects[key].delete()
        else:
            self._objects[key].create(obj)
        history = self._objects[key].history
        if len(history) > self.history_limit:
            del history[: len(history) - self.history_limit]

    def _get(self, key: Key) -> dict[str, Any] | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._objects[key].last.raw

    def _not_found(self, res: kmock.resource, name: str) -> k8s.KubernetesError:
        return k8s.KubernetesError(
            404, "NotFound", f'{res.plural} "{name}" not found', {"name": name, "kind": res.plural}
        )

    def _create(
        self, res: kmock.resource, namespace: str | None, body: dict[str, Any],
        validation: str = "",
    ) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        if not self._namespaced(res):
            namespace = None
            meta.pop("namespace", None)
        else:
            namespace = namespace or meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, namespace):
                raise k8s.KubernetesError(
                    400, "BadRequest", "the namespace of the object does not match the URL"
                )
            meta["namespace"] = namespace
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise k8s.KubernetesError(
                    422, "Invalid", "metadata.name or metadata.generateName is required"
                )
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            meta["name"] = meta["generateName"] + "".join(random.choices(alphabet, k=5))
        key: Key = (res, namespace, meta["name"])
        if self._get(key) is not None:
            raise k8s.KubernetesError(
                409,
                "AlreadyExists",
                f'{res.plural} "{meta["name"]}" already exists',
                {"name": meta["name"], "kind": res.plural},
            )
        for stale in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(stale, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso()
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_rv()
        if res == kmock.resource("", "v1", "pods"):
            body["status"] = {"phase": "Pending"}
        elif self._is_custom(res) and self._has_status(res):
            body.pop("status", None)
        if self._is_custom(res):
            body = self._admit(res, body, validation)
        self._store(key, body)
        self._notify(res, "ADDED", None, body)
        return body

    def _patch(self, request: rendering.Request) -> dict[str, Any]:
        res = request.resource
        assert res is not None and request.name is not None
        namespace = request.namespace if self._namespaced(res) else None
        key: Key = (res, namespace, request.name)
        old = self._get(key)
        if old is None:
            raise self._not_found(res, request.name)
        patch = request.data
        kind = request.headers.get("Content-Type", "").split(";")[0].strip()
        allowed = {"application/merge-patch+json", "application/json-patch+json"}
        if not self._is_custom(res):
            allowed.add("application/strategic-merge-patch+json")
        if kind not in allowed:
            raise k8s.KubernetesError(
                415, "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(sorted(allowed))}")
        try:
            if isinstance(patch, list):
                patched = jsonpatch.apply_patch(copy.deepcopy(old), patch)
            elif isinstance(patch, dict):
                patched = _merge_patch(old, patch)
            else:
                raise ValueError("the patch must be an object or a list")
        except (ValueError, jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise k8s.KubernetesError(422, "Invalid", f"cannot apply the patch: {exc}") from None
        wanted_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(
            patch, dict
        ) else None
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise k8s.KubernetesError(
                409, "Conflict", "the object has been modified; apply your changes to the latest"
            )
        if request.subresource == "status":
            new = copy.deepcopy(old)
            if "status" in patched:
                new["status"] = patched["status"]
            else:
                new.pop("status", None)
        elif request.subresource is None:
            new = patched
            if self._has_status(res):
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        else:
            raise k8s.KubernetesError(404, "NotFound", f"no subresource {request.subresource!r}")
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for fixed in ("uid", "name", "namespace", "creationTimestamp", "generation",
                      "deletionTimestamp", "resourceVersion"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        if self._is_custom(res):
            new = self._admit(res, new, request.params.get("fieldValidation", ""))
        if new == old:
            return old  # a no-op write: no new version, no event
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(res, key, new)
            return new
        self._store(key, new)
        self._notify(res, "MODIFIED", old, new)
        return new

    def _admit(self, res: kmock.resource, obj: dict[str, Any], validation: str) -> dict[str, Any]:
        """What the API server does with a custom resource: prune unknown fields (or reject them
        with fieldValidation=Strict, as kubectl asks), then validate against the schema."""
        schema = self._schemas.get(res)
        if schema is None:
            return obj
        unknown: list[str] = []
        pruned = dict(obj)
        for part in ("spec", "status"):
            if part in obj and part in schema.get("properties", {}):
                pruned[part] = _prune(obj[part], schema["properties"][part], part, unknown)
        name = obj.get("metadata", {}).get("name", "")
        what = f'{self._kind(res)}.{res.group} "{name}"'
        if unknown and validation == "Strict":
            raise k8s.KubernetesError(
                422, "Invalid", f"{what} is invalid: strict decoding error: "
                + ", ".join(f'unknown field "{u}"' for u in unknown))
        problems = [
            f"{'.'.join(str(p) for p in err.absolute_path)}: Invalid value: {err.message}"
            for err in jsonschema.Draft4Validator(schema).iter_errors(pruned)
        ]
        if problems:
            raise k8s.KubernetesError(422, "Invalid", f"{what} is invalid: " + "; ".join(problems))
        return pruned

    def _delete(
        self, res: kmock.resource, namespace: str | None, name: str, *, orphan: bool = False
    ) -> dict[str, Any]:
        namespace = namespace if self._namespaced(res) else None
        key: Key = (res, namespace, name)
        old = self._get(key)
        if old is None:
            raise self._not_found(res, name)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_iso()
            new["metadata"]["resourceVersion"] = self._next_rv()
            self._store(key, new)
            self._notify(res, "MODIFIED", old, new)
            return new
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._remove(res, key, gone, orphan=orphan)
        return gone

    def _remove(
        self, res: kmock.resource, key: Key, last: dict[str, Any], *, orphan: bool = False
    ) -> None:
        self._store(key, None)
        self._notify(res, "DELETED", last, last)
        if orphan:
            return
        uid = last["metadata"].get("uid")
        dependents = [
            k
            for k, obj in list(self._objects.items())
            if not obj.deleted
            and any(
                ref.get("uid") == uid for ref in obj.last.raw["metadata"].get("ownerReferences", [])
            )
        ]
        for dep_res, dep_ns, dep_name in dependents:
            with contextlib.suppress(k8s.KubernetesError):
                self._delete(dep_res, dep_ns, dep_name)

    def _notify(
        self, res: kmock.resource, kind: str, old: dict[str, Any] | None, new: dict[str, Any]
    ) -> None:
        if self.record_writes:
            meta = new["metadata"]
            self.writes.append((time.monotonic(), kind, res.plural or "", meta.get("namespace"),
                                meta["name"]))
        log = self._log.setdefault(res, collections.deque())
        log.append((int(new["metadata"]["resourceVersion"]), kind, old, new))
        if len(log) > self.event_log_limit:
            self._compacted[res] = log.popleft()[0]
        for wid in self._watchers.get(res, ()):
            watcher = self._watcher_objs[wid]
            event = watcher.translate(kind, old, new)
            if event is not None:
                watcher.queue.put_nowait(event)

    # --- reads ---
    def _api_version(self, res: kmock.resource) -> str:
        return res.version if not res.group else f"{res.group}/{res.version}"

    def _kind(self, res: kmock.resource) -> str:
        kind = self.resources[res].kind if res in self.resources else None
        return kind or (res.plural or "").capitalize() or "Object"

    def _known(self, res: kmock.resource | None) -> kmock.resource:
        if res is None or res not in self.resources:
            raise k8s.KubernetesResourceNotFoundError()
        return res

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        res = self._known(request.resource)
        watcher = _Watcher(
            namespace=request.namespace,
            name=None,
            labels=label_matcher(request.params.get("labelSelector")),
            fields=field_matcher(request.params.get("fieldSelector")),
        )
        items = [obj for _, obj in self.live(res) if watcher.sees(obj)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        if _wants_table(request):
            return self._table(res, request, items)
        return {
            "apiVersion": self._api_version(res),
            "kind": f"{self._kind(res)}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        res = self._known(request.resource)
        namespace = request.namespace if self._namespaced(res) else None
        obj = self._get((res, namespace, request.name or ""))
        if obj is None:
            raise self._not_found(res, request.name or "")
        return self._table(res, request, [obj]) if _wants_table(request) else obj

    def _serve_watch(self, request: rendering.Request) -> rendering.Payload:  # type: ignore[override]
        self._known(request.resource)
        return rendering.Response(
            headers={"Content-Type": "application/json"}, payload=self._watch(request)
        )

    async def _watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        res = request.resource
        assert res is not None
        params = request.params
        watcher = _Watcher(
            namespace=request.namespace,
            name=request.name,
            labels=label_matcher(params.get("labelSelector")),
            fields=field_matcher(params.get("fieldSelector")),
        )
        deadline = (
            time.monotonic() + float(params["timeoutSeconds"])
            if params.get("timeoutSeconds")
            else None
        )
        bookmarks = params.get("allowWatchBookmarks") == "true"
        since = params.get("resourceVersion", "")
        backlog: list[dict[str, Any]] = []
        # Register and snapshot in one synchronous step: nothing can happen in between.
        if since in ("", "0") or params.get("sendInitialEvents") == "true":
            live = sorted(
                (obj for _, obj in self.live(res) if watcher.sees(obj)),
                key=lambda o: int(o["metadata"]["resourceVersion"]),
            )
            backlog = [{"type": "ADDED", "object": obj} for obj in live]
            if params.get("sendInitialEvents") == "true":
                backlog.append(self._bookmark(res, initial_end=True))
        else:
            try:
                since_rv = int(since)
            except ValueError:
                raise k8s.KubernetesError(
                    400, "BadRequest", f"bad resourceVersion {since!r}"
                ) from None
            if since_rv < self._compacted.get(res, 0):
                backlog = [{"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since_rv}",
                }}]
            else:
                for rv, kind, old, new in self._log.get(res, ()):
                    if rv > since_rv and (event := watcher.translate(kind, old, new)):
                        backlog.append(event)
        wid = id(watcher)
        self._watcher_objs[wid] = watcher
        self._watchers.setdefault(res, set()).add(wid)
        try:
            yield b""  # send the headers now, even if nothing happens for a while
            for event in backlog:
                yield event
                if event["type"] == "ERROR":
                    return
            while True:
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    wait = left if wait is None else min(wait, left)
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and (deadline is None or deadline > time.monotonic()):
                        yield self._bookmark(res)
                    continue
                yield event
        finally:
            self._watchers.get(res, set()).discard(wid)
            self._watcher_objs.pop(wid, None)

    def _bookmark(self, res: kmock.resource, *, initial_end: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"apiVersion": self._api_version(res), "kind": self._kind(res),
                       "metadata": meta},
        }

    def _table(
        self, res: kmock.resource, request: rendering.Request, items: list[dict[str, Any]]
    ) -> rendering.Payload:
        columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                    "description": "Name of the object"}]
        printer = self._printer_columns.get(res)
        if printer is None:
            printer = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
            if res == kmock.resource("", "v1", "pods"):
                printer = [{"name": "Status", "type": "string", "jsonPath": ".status.phase"},
                           *printer]
        for col in printer:
            columns.append({"name": col["name"], "type": col["type"],
                            "format": col.get("format", ""), "priority": col.get("priority", 0),
                            "description": col.get("description", "")})
        include = request.params.get("includeObject", "PartialObjectMetadata")
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for col in printer:
                value = _json_path(obj, col["jsonPath"])
                if col["type"] == "date" and isinstance(value, str):
                    value = human_age(time.time() - parse_iso(value).timestamp())
                cells.append(value)
            shown: Any = obj if include == "Object" else None
            if include == "PartialObjectMetadata":
                shown = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                         "metadata": obj["metadata"]}
            rows.append({"cells": cells, "object": shown})
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._rv)},
            "columnDefinitions": columns,
            "rows": rows,
        }


def _wants_table(request: rendering.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _json_path(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.strip(".").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _prune(value: Any, schema: Mapping[str, Any], path: str, unknown: list[str]) -> Any:
    """Drop fields the structural schema does not know, and nulls it does not allow."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            kept = {}
            for key, item in value.items():
                if key not in props:
                    unknown.append(f"{path}.{key}")
                elif item is not None or props[key].get("nullable"):
                    kept[key] = _prune(item, props[key], f"{path}.{key}", unknown)
            return kept
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            return {k: _prune(v, extra, f"{path}.{k}", unknown) for k, v in value.items()}
        return value
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_prune(v, schema["items"], f"{path}[{i}]", unknown) for i, v in enumerate(value)]
    return value


def _without(obj: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


# --- running it -------------------------------------------------------------------------------
class EmulatorThread:
    """The emulator and its HTTP server in a thread of their own, with their own event loop."""

    def __init__(self, *, bookmark_interval: float = 60.0, record_writes: bool = False) -> None:
        self.bookmark_interval = bookmark_interval
        self.record_writes = record_writes
        self.emulator: Emulator
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the emulator did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        emu = Emulator(bookmark_interval=self.bookmark_interval, record_writes=self.record_writes)
        async with emu, kmock.Server(emu) as server:
            self.emulator = emu
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run fn in the emulator's loop (its state is not thread-safe) and return its result."""
        assert self._loop is not None

        async def invoke() -> Any:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(30)

    # --- conveniences used by the tests ---
    def install_crd(self, path: Path = CRD_FILE) -> dict[str, Any]:
        crd = yaml.safe_load(path.read_text())
        self.call(self.emulator.install_crd, crd)
        return crd

    def clear_requests(self) -> None:
        self.call(self.emulator.clear_requests)

    def requests(self) -> list[RecordedRequest]:
        def snapshot() -> list[RecordedRequest]:
            return [RecordedRequest.of(r) for r in self.emulator._requests]

        return self.call(snapshot)

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "tester",
                                      "namespace": namespace}}],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    group: str | None
    plural: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    watch: bool
    user_agent: str
    data: Any = None  # the parsed JSON body, if any

    @classmethod
    def of(cls, r: rendering.Request) -> RecordedRequest:
        res = r.resource
        return cls(
            method=str(r.method.value if hasattr(r.method, "value") else r.method).upper(),
            path=r.url.path,
            group=res.group if res is not None else None,
            plural=res.plural if res is not None else None,
            subresource=r.subresource,
            namespace=r.namespace,
            name=r.name,
            watch=r.params.get("watch") in ("true", "1"),
            user_agent=r.headers.get("User-Agent", ""),
            data=r.data,
        )

    @property
    def rbac(self) -> tuple[str, str, str] | None:
        """(apiGroup, resource[/subresource], verb) as RBAC sees it; None for discovery."""
        if self.plural is None or self.group is None:
            return None
        resource = f"{self.plural}/{self.subresource}" if self.subresource else self.plural
        verb = {
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete" if self.name else "deletecollection",
        }.get(self.method)
        if self.method == "GET":
            verb = "watch" if self.watch else ("get" if self.name else "list")
        return (self.group, resource, verb or self.method.lower())
