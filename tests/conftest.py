"""Shared test setup: paths and a per-test TMPDIR so concurrent runs never share files."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_control_plane import ControlPlane

ROOT = Path(__file__).resolve().parent.parent
# The example job files (examples/ also holds other manifests, such as prepare-data-job.yaml).
EXAMPLES = sorted(
    p for p in (ROOT / "examples").glob("*.yaml") if "\nkind: LlamaTrainingJob\n" in p.read_text()
)
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


# --- the real control plane, one per session --------------------------------------------------
CRD_FILE = ROOT / "crds" / "llamatrainingjobs.llamajob.dev.yaml"


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler (k8s_control_plane),
    shared by every test that needs them; each test works in namespaces of its own."""
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    plane.start()
    timings = {k: round(v, 2) for k, v in plane.start_seconds.items()}
    print(f"control plane started: {json.dumps(timings)}")
    try:
        yield plane
    finally:
        begin = time.monotonic()
        plane.stop()
        print(f"control plane stopped in {time.monotonic() - begin:.1f}s")


@pytest.fixture(scope="session")
def crd(k8s: ControlPlane) -> dict[str, Any]:
    """The CRD, installed with kubectl apply exactly as a user installs it, and Established."""
    name = yaml.safe_load(CRD_FILE.read_text())["metadata"]["name"]
    k8s.kubectl("apply", "-f", str(CRD_FILE))
    k8s.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{name}")
    installed: dict[str, Any] = k8s.ok(
        "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    return installed
