"""`llamajob plan` as a user runs it: the console script, exit codes, stderr, JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

JSON_KEYS = {
    "fits",
    "memory_per_core_gib",
    "core_memory_gib",
    "world_size",
    "data_parallel",
    "pods",
    "tokens_per_step",
    "flops_per_step",
    "step_seconds",
    "total_seconds",
    "total_cost_usd",
    "errors",
}


def run(bin_: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_, "plan", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("name", ["tiny", "llama3-8b", "llama3-70b"])
def test_examples_plan_cleanly(llamajob_bin: str, name: str) -> None:
    res = run(llamajob_bin, str(ROOT / "examples" / f"{name}.yaml"))
    assert res.returncode == 0, res.stderr
    assert "fits" in res.stdout and res.stderr == ""


def test_json_output_has_the_documented_keys(llamajob_bin: str) -> None:
    res = run(llamajob_bin, str(ROOT / "examples" / "llama3-70b.yaml"), "-o", "json")
    assert res.returncode == 0
    data = json.loads(res.stdout)
    assert set(data) >= JSON_KEYS
    assert data["fits"] is True and data["pods"] == 16 and data["errors"] == []
    assert data["memory_per_core_gib"] < data["core_memory_gib"] == 16.0


def test_tokens_and_measured_tflops(llamajob_bin: str) -> None:
    res = run(
        llamajob_bin,
        str(ROOT / "examples" / "llama3-8b.yaml"),
        "--tflops",
        "634",
        "--tokens",
        "15e12",
        "-o",
        "json",
    )
    data = json.loads(res.stdout)
    assert data["total_seconds"] / (365.25 * 86400) > 20
    assert data["total_cost_usd"] > 1e6


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def _tiny_with(**spec_changes: object) -> str:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    for dotted, value in spec_changes.items():
        node = obj
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return yaml.safe_dump(obj)


BAD_INPUTS = [
    ("malformed", "spec: [unclosed\n", "malformed YAML at line"),
    ("wrong-kind", _tiny_with(kind="Job"), "kind: must be LlamaTrainingJob"),
    (
        "wrong-api",
        _tiny_with(apiVersion="llamajob.dev/v1"),
        "apiVersion: must be llamajob.dev/v1alpha1",
    ),
    (
        "unknown-field",
        _tiny_with(spec__parallelism__tensr=2),
        "spec.parallelism.tensr: unknown field",
    ),
    ("wrong-type", _tiny_with(spec__batch__globalBatchSize="lots"), "spec.batch.globalBatchSize:"),
    ("negative", _tiny_with(spec__maxSteps=-5), "spec.maxSteps: Input should be greater than"),
    ("bad-enum", _tiny_with(spec__model__preset="gpt2"), "spec.model.preset:"),
    ("bad-resume", _tiny_with(spec__checkpoint__resume="latest"), "spec.checkpoint.resume:"),
    (
        "layout",
        _tiny_with(spec__parallelism__tensor=3),
        "spec.parallelism.tensor: 3 does not divide",
    ),
    ("lr-order", _tiny_with(spec__optimizer__minLr=0.5), "minLr (0.5) must not exceed lr"),
    (
        "validation-batches",
        _tiny_with(spec__validation__sequences=12),
        "validation.sequences (12) must be a multiple of batch.globalBatchSize (16)",
    ),
    ("empty", "", "expected a mapping"),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_clear_message(
    llamajob_bin: str, tmp_path: Path, case: str, text: str, message: str
) -> None:
    res = run(llamajob_bin, _write(tmp_path, text))
    assert res.returncode == 2, (case, res.stdout, res.stderr)
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_several_problems_are_all_reported(llamajob_bin: str, tmp_path: Path) -> None:
    text = _tiny_with(spec__maxSteps=-1, spec__parallelism__tensr=2, spec__seed="x")
    res = run(llamajob_bin, _write(tmp_path, text))
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 3, res.stderr
    assert any("spec.seed" in ln for ln in lines)


def test_not_fitting_exits_2_with_the_fix(llamajob_bin: str, tmp_path: Path) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "llama3-8b.yaml").read_text())
    obj["spec"]["parallelism"].update(tensor=8, kvReplicator=1)
    res = run(llamajob_bin, _write(tmp_path, yaml.safe_dump(obj)), "-o", "json")
    assert res.returncode == 2
    data = json.loads(res.stdout)
    assert data["fits"] is False and data["suggestion"].startswith("tensor: 8 -> ")
    assert "does not fit" not in res.stderr.lower() or "GiB" in res.stderr
    assert "smallest change that fits: tensor: 8 ->" in res.stderr


@pytest.mark.parametrize(
    "changes",
    [
        {"spec__model__numHeads": 999_999_937},
        {"spec__model__numHeads": 999_999_937, "spec__model__hiddenSize": 999_999_937,
         "spec__model__numKvHeads": 3, "spec__model__numLayers": 999_999_937,
         "spec__parallelism__pipeline": 2},
    ],
    ids=["prime-heads", "prime-heads-and-layers"],
)
def test_absurd_numbers_are_judged_at_once(
    llamajob_bin: str, tmp_path: Path, changes: dict[str, object]
) -> None:
    # A search linear in these values takes over 30 s; the timeout (well above start-up on a
    # loaded machine) separates the two. Whether the models' maxima or the planner answers, the
    # field is named.
    res = subprocess.run(
        [llamajob_bin, "plan", _write(tmp_path, _tiny_with(**changes))],
        capture_output=True, text=True, timeout=20, check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "error: spec.model." in res.stderr and "numHeads" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_missing_file(llamajob_bin: str, tmp_path: Path) -> None:
    res = run(llamajob_bin, str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "cannot read" in res.stderr


def test_bad_flag_values(llamajob_bin: str) -> None:
    res = run(llamajob_bin, str(ROOT / "examples" / "tiny.yaml"), "--mfu", "1.5")
    assert res.returncode == 2 and "--mfu" in res.stderr
    # One line, like a bad file (argparse would print its usage text first).
    assert res.stderr.count("\n") == 1 and "usage:" not in res.stderr, res.stderr


def test_crd_command_prints_the_committed_file(llamajob_bin: str) -> None:
    res = subprocess.run([llamajob_bin, "crd"], capture_output=True, text=True, timeout=60)
    assert res.stdout == (ROOT / "crds" / "llamatrainingjobs.llamajob.dev.yaml").read_text()


def test_operator_package_never_imports_torch() -> None:
    code = (
        "import sys, llamajob.api, llamajob.plan, llamajob.crd, llamajob.cli, llamajob.jobfile;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
