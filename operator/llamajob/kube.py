"""A thin asynchronous Kubernetes API client for the operator's writes.

kopf watches and indexes; this client creates children, deletes pods, patches the job's status
subresource and posts Events, with the credentials kopf's login produced. Only what the
operator needs, all requests visible in one place (``permissions.py`` lists the same verbs).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiohttp
import kopf

from .api import GROUP, KIND, PLURAL, VERSION


def _version() -> str:
    try:
        return version("llamajob")
    except PackageNotFoundError:
        return "dev"


USER_AGENT = f"llamajob-operator/{_version()}"
EVENT_COMPONENT = "llamajob-operator"

# kind -> (API prefix, plural). Everything the operator writes.
_KINDS: dict[str, tuple[str, str]] = {
    "Pod": ("api/v1", "pods"),
    "Service": ("api/v1", "services"),
    "ConfigMap": ("api/v1", "configmaps"),
    "Event": ("api/v1", "events"),
    KIND: (f"apis/{GROUP}/{VERSION}", PLURAL),
}
_RETRY_STATUSES = {429, 500, 502, 503, 504}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def object_path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    try:
        prefix, plural = _KINDS[kind]
    except KeyError:
        raise ValueError(f"the operator does not write {kind} objects") from None
    path = f"/{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeClient:
    """One aiohttp session against the API server. ``relogin`` is called once on a 401 (an
    expired service-account token) to get fresh credentials."""

    def __init__(
        self,
        info: kopf.ConnectionInfo,
        *,
        relogin: Callable[[], kopf.ConnectionInfo | None] | None = None,
        concurrency: int = 32,
        retries: int = 3,
    ) -> None:
        self._info = info
        self._relogin = relogin
        self._concurrency = concurrency
        self._retries = retries
        self._session: aiohttp.ClientSession | None = None
        self.instance = os.environ.get("HOSTNAME") or socket.gethostname()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            info = self._info
            headers = {**info.as_http_headers(), "User-Agent": USER_AGENT}
            ssl = info.as_ssl_context() if str(info.server).startswith("https") else False
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._concurrency, ssl=ssl),
                headers=headers,
                trust_env=bool(info.trust_env),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
    ) -> Any:
        url = str(self._info.server).rstrip("/") + path
        relogged = False
        for attempt in range(self._retries + 1):
            session = self._open()
            try:
                async with session.request(
                    method,
                    url,
                    json=body,
                    headers={"Content-Type": content_type} if body is not None else None,
                    timeout=aiohttp.ClientTimeout(total=30),
                    proxy=self._info.proxy_url,
                ) as resp:
                    text = await resp.text()
                    try:
                        payload = json.loads(text) if text else {}
                    except ValueError:  # a proxy's HTML error page, say
                        payload = {"message": text[:200]}
                    if resp.status < 400:
                        return payload
                    if resp.status == 401 and not relogged and self._relogin is not None:
                        fresh = self._relogin()
                        if fresh is not None:
                            self._info, relogged = fresh, True
                            await self.close()
                            continue
                    error = ApiError(
                        resp.status,
                        str((payload or {}).get("reason", resp.reason)),
                        str((payload or {}).get("message", "")),
                    )
                    if resp.status not in _RETRY_STATUSES or attempt == self._retries:
                        raise error
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                if attempt == self._retries:
                    raise ApiError(0, exc.__class__.__name__, str(exc)) from None
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
        raise AssertionError("unreachable")

    # --- the operator's verbs ---
    async def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = object_path(manifest["kind"], meta["namespace"])
        return await self.request("POST", path, manifest)

    async def delete(
        self, kind: str, namespace: str, name: str, grace_seconds: int | None = None
    ) -> None:
        options: dict[str, Any] = {
            "apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"
        }
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        await self.request("DELETE", object_path(kind, namespace, name), options)

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any],
                           resource_version: str | None = None) -> Any:
        """A merge patch of the status subresource. With `resource_version` it is a
        conditional write: the API server answers 409 Conflict if the object changed since
        that version, rather than merging a decision made from a stale status."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.request(
            "PATCH",
            object_path(KIND, namespace, name, "status"),
            body,
            content_type="application/merge-patch+json",
        )

    async def post_event(
        self, job: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        meta = job.get("metadata", {})
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'job')}.", "namespace":
                         meta.get("namespace", "default")},
            "involvedObject": {
                "apiVersion": job.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": job.get("kind", KIND),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.create(event)
