"""Reading training progress from rank 0's Prometheus endpoint, and the operator's own metrics.

The expositions are produced by the trainer's metrics module, so a renamed metric on either
side fails here.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import aiohttp.web
import pytest
from llamajob import metrics
from llamajob.progress import MAX_BODY_BYTES, ScrapeError, metrics_url, parse_progress, scrape
from llamajob_trainer.metrics import build_registry
from prometheus_client import generate_latest

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def exposition(job: str = "llm", namespace: str = "default", **values: float) -> str:
    registry, m = build_registry(job, namespace)
    for name, value in values.items():
        getattr(m, name).set(value)
    return generate_latest(registry).decode()


def test_parses_the_trainers_exposition() -> None:
    text = exposition(step=120, loss=2.75, tokens_per_second=31000.5, mfu=0.28,
                      last_checkpoint_step=100, max_steps=1000, validation_loss=2.9,
                      process_restarts=2)
    p = parse_progress(text, now=NOW, job="llm", namespace="default")
    assert p is not None
    assert (p.step, p.loss, p.tokens_per_second, p.mfu) == (120, 2.75, 31000.5, 0.28)
    assert (p.last_checkpoint_step, p.max_steps, p.observed_at) == (100, 1000, NOW)
    assert p.validation_loss == 2.9 and p.process_restarts == 2
    # Without validation the trainer leaves the gauge at NaN: no figure.
    assert parse_progress(exposition(step=1), now=NOW).validation_loss is None  # type: ignore[union-attr]
    assert isinstance(p.step, int) and isinstance(p.last_checkpoint_step, int)


def test_other_jobs_samples_are_ignored() -> None:
    text = exposition(job="someone-else", step=5, loss=1.0)
    assert parse_progress(text, now=NOW, job="llm", namespace="default") is None
    text = exposition(namespace="other-ns", step=5, loss=1.0)
    assert parse_progress(text, now=NOW, job="llm", namespace="default") is None
    # Without labels to compare (a plain exporter), the sample is taken.
    plain = "# TYPE llamajob_train_step gauge\nllamajob_train_step 9\n"
    assert parse_progress(plain, now=NOW, job="llm").step == 9  # type: ignore[union-attr]


def test_no_step_means_no_progress_and_nan_is_unknown() -> None:
    assert parse_progress("# nothing here\n", now=NOW) is None
    text = "llamajob_train_step 3\nllamajob_train_loss NaN\nllamajob_train_mfu +Inf\n"
    p = parse_progress(text, now=NOW)
    assert p is not None and p.step == 3 and p.loss is None
    assert p.mfu is not None and math.isinf(p.mfu)


def test_garbage_is_a_scrape_error() -> None:
    with pytest.raises(ScrapeError):
        parse_progress("llamajob_train_step{job= 3\n", now=NOW)


def test_metrics_url() -> None:
    assert metrics_url("10.0.0.7") == "http://10.0.0.7:9400/metrics"
    assert metrics_url("fd00::5", port=9401) == "http://[fd00::5]:9401/metrics"


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[str, dict[str, object]]]:
    behaviour: dict[str, object] = {"status": 200, "body": exposition(step=7, loss=3.5)}

    async def handle(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(status=int(behaviour["status"]),  # type: ignore[call-overload]
                                    text=str(behaviour["body"]))

    app = aiohttp.web.Application()
    app.router.add_get("/metrics", handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/metrics", behaviour
    await runner.cleanup()


async def test_scrape_over_http(endpoint: tuple[str, dict[str, object]]) -> None:
    url, behaviour = endpoint
    async with aiohttp.ClientSession() as session:
        p = await scrape(session, url, now=NOW, job="llm", namespace="default")
        assert p is not None and (p.step, p.loss) == (7, 3.5)

        behaviour["status"] = 503
        with pytest.raises(ScrapeError, match="HTTP 503"):
            await scrape(session, url, now=NOW)

        behaviour["status"], behaviour["body"] = 200, "x" * (MAX_BODY_BYTES + 10)
        with pytest.raises(ScrapeError, match="larger than"):
            await scrape(session, url, now=NOW)

        closed = url.replace(url.split(":")[2].split("/")[0], "1")  # nothing listens on port 1
        with pytest.raises(ScrapeError):
            await scrape(session, closed, now=NOW, timeout=2)


def test_operator_metric_names_are_the_catalogue() -> None:
    names = {m.name for m in metrics.REGISTRY.collect()}
    # prometheus_client reports counters without their _total suffix.
    expected = {n.removesuffix("_total") for n in metrics.METRIC_NAMES}
    assert names == expected
    kinds = {m.name: m.type for m in metrics.REGISTRY.collect()}
    assert kinds["llamajob_jobs"] == "gauge"
    assert kinds["llamajob_job_restarts"] == "counter"
    for hist in ("llamajob_reconcile_duration_seconds", "llamajob_fault_detection_seconds",
                 "llamajob_restart_latency_seconds"):
        assert kinds[hist] == "histogram"


def test_jobs_gauge_counts_phases_and_drops_to_zero() -> None:
    metrics.set_job_phases([("ns-gauge", "Training"), ("ns-gauge", "Training"),
                            ("ns-gauge", "Pending")])

    def value(phase: str) -> float | None:
        return metrics.REGISTRY.get_sample_value(
            "llamajob_jobs", {"phase": phase, "namespace": "ns-gauge"})

    assert (value("Training"), value("Pending"), value("Failed")) == (2.0, 1.0, 0.0)
    metrics.set_job_phases([])  # every job gone
    assert value("Training") == 0.0 and value("Pending") == 0.0
