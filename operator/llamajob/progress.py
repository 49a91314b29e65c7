"""Training progress from rank 0's Prometheus endpoint: the operator's one source of progress.

``parse_progress`` is pure (exposition text in, ``Progress`` out); ``scrape`` adds the HTTP GET.
Metric names are the trainer's, from ``llamajob_trainer.protocol``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime

import aiohttp
from llamajob_trainer import protocol
from prometheus_client.parser import text_string_to_metric_families

from .observed import Progress

_WANTED = {
    protocol.TRAIN_STEP,
    protocol.TRAIN_LOSS,
    protocol.TRAIN_TOKENS_PER_SECOND,
    protocol.TRAIN_MFU,
    protocol.LAST_CHECKPOINT_STEP,
    protocol.TRAIN_MAX_STEPS,
    protocol.VALIDATION_LOSS,
    protocol.TRAIN_PROCESS_RESTARTS,
    protocol.CHECKPOINTS_QUARANTINED,
}
# A metrics page is a few kB; anything far larger is not the trainer.
MAX_BODY_BYTES = 4 * 1024 * 1024


class ScrapeError(Exception):
    """The endpoint could not be read or did not look like the trainer's."""


def _pick(
    samples: list[tuple[Mapping[str, str], float]], job: str | None, namespace: str | None
) -> float | None:
    """The sample for this job: labels must agree where present (a stale or shared endpoint
    would otherwise report another job's progress)."""
    for labels, value in samples:
        if job is not None and labels.get("job", job) != job:
            continue
        if namespace is not None and labels.get("namespace", namespace) != namespace:
            continue
        return None if math.isnan(value) else value
    return None


def parse_progress(
    text: str, *, now: datetime, job: str | None = None, namespace: str | None = None
) -> Progress | None:
    """Progress from an exposition; None when it has no step for this job (not started yet)."""
    found: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in _WANTED:
                    found.setdefault(sample.name, []).append((sample.labels, sample.value))
    except ValueError as exc:
        raise ScrapeError(f"not a Prometheus exposition: {exc}") from None

    def value(name: str) -> float | None:
        return _pick(found.get(name, []), job, namespace)

    def integer(name: str) -> int | None:
        v = value(name)
        return None if v is None or math.isinf(v) else int(v)

    step = integer(protocol.TRAIN_STEP)
    if step is None:
        return None
    return Progress(
        step=step,
        loss=value(protocol.TRAIN_LOSS),
        tokens_per_second=value(protocol.TRAIN_TOKENS_PER_SECOND),
        mfu=value(protocol.TRAIN_MFU),
        last_checkpoint_step=integer(protocol.LAST_CHECKPOINT_STEP),
        max_steps=integer(protocol.TRAIN_MAX_STEPS),
        observed_at=now,
        validation_loss=value(protocol.VALIDATION_LOSS),
        process_restarts=integer(protocol.TRAIN_PROCESS_RESTARTS),
        checkpoints_quarantined=integer(protocol.CHECKPOINTS_QUARANTINED),
    )


def metrics_url(ip: str, *, scheme: str = "http", port: int = protocol.DEFAULT_METRICS_PORT) -> str:
    host = f"[{ip}]" if ":" in ip else ip  # IPv6 pod IPs need brackets in a URL
    return f"{scheme}://{host}:{port}/metrics"


async def scrape(
    session: aiohttp.ClientSession,
    url: str,
    *,
    now: datetime,
    job: str | None = None,
    namespace: str | None = None,
    timeout: float = 5.0,
) -> Progress | None:
    """GET the endpoint and parse it. Raises ScrapeError for anything but a readable page."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise ScrapeError(f"{url} answered HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise ScrapeError(f"{url}: response larger than {MAX_BODY_BYTES} bytes")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ScrapeError(f"{url}: {exc.__class__.__name__}: {exc}") from None
    return parse_progress(body.decode(errors="replace"), now=now, job=job, namespace=namespace)
