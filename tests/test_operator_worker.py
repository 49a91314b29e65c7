"""The per-job worker task of the kopf shell: stopping it really stops it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from llamajob.worker import JobWorker, OperatorConfig


async def test_worker_woken_and_stopped_in_one_step_never_reconciles_again() -> None:
    """A job deleted together with its pods: the pods' events wake the worker in the same loop
    step as the job's deletion stops it. Python 3.11's wait_for can swallow that cancel; the
    worker must still end, and must not act for the deleted job (it would recreate its pods)."""
    worker = JobWorker(SimpleNamespace(config=OperatorConfig()), "default", "gone")  # type: ignore[arg-type]
    passes: list[str] = []

    async def reconcile_once(woken_at: float) -> None:
        passes.append("pass")

    worker.reconcile_once = reconcile_once  # type: ignore[method-assign]
    worker.start()
    for _ in range(50):
        if passes:
            break
        await asyncio.sleep(0.01)
    assert passes == ["pass"], "the first pass should run on start"

    for _ in range(20):  # the race depends on scheduling; try it several times
        passes.clear()
        worker.stopped = False
        # A pending requeue makes the worker wait with a timeout, the path where 3.11's
        # wait_for can lose the cancel.
        worker.requeue_at = time.monotonic() + 20
        worker.start()
        await asyncio.sleep(0.05)
        passes.clear()
        worker.wake()
        await asyncio.wait_for(worker.stop(), timeout=5)
        await asyncio.sleep(0.05)
        assert worker._task is None
        assert passes == [], "a stopped worker reconciled again"
