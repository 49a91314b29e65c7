"""Shared test setup: paths and a per-test TMPDIR so concurrent runs never share files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BIN = Path(sys.executable).parent


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def llamajob_bin() -> str:
    """The installed console script, run as a user would."""
    path = BIN / "llamajob"
    assert path.exists(), f"console script missing at {path}; run `pip install -e .`"
    return str(path)


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Subprocesses (torchrun, kubectl) inherit this, so each test has its own scratch space.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def avoided_nodes(pod: dict[str, Any]) -> list[str]:
    """Node names a pod manifest asks the scheduler to avoid (preferred node anti-affinity)."""
    terms = pod["spec"]["affinity"].get("nodeAffinity", {}).get(
        "preferredDuringSchedulingIgnoredDuringExecution", []
    )
    assert all(t["weight"] == 100 for t in terms)
    return [
        name
        for t in terms
        for field in t["preference"]["matchFields"]
        if field["key"] == "metadata.name" and field["operator"] == "NotIn"
        for name in field["values"]
    ]
