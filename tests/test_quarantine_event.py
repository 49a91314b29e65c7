"""The trainer's count of quarantined checkpoints reaches the job: status and one Warning event
per increase (parsed from rank 0's metrics like the rest of the progress)."""

from __future__ import annotations

from dataclasses import replace

from llamajob.progress import parse_progress
from llamajob_trainer import protocol
from test_reconcile import events, running_world

PAGE = """# TYPE {step} gauge
{step}{{job="demo",namespace="ml"}} 12
# TYPE {q} gauge
{q}{{job="demo",namespace="ml"}} {n}
"""


def test_quarantined_checkpoints_become_status_and_one_warning() -> None:
    w = running_world()

    def scrape(n: int) -> None:
        text = PAGE.format(step=protocol.TRAIN_STEP, q=protocol.CHECKPOINTS_QUARANTINED, n=n)
        progress = parse_progress(text, now=w.now, job="demo", namespace="ml")
        w.observed = replace(w.observed, progress=progress)

    scrape(0)
    d = w.step(1)
    assert d.status.checkpoints_quarantined == 0
    assert "CheckpointQuarantined" not in [r for _, r in events(d)]
    scrape(2)
    d = w.step(1)
    assert d.status.checkpoints_quarantined == 2
    assert ("Warning", "CheckpointQuarantined") in events(d)
    (event,) = [e for e in d.events if e.reason == "CheckpointQuarantined"]
    assert "checkpoints/quarantine/" in event.message and "nothing was deleted" in event.message
    d = w.step(1)  # the same reading again: no second event
    assert "CheckpointQuarantined" not in [r for _, r in events(d)]
