"""`llamajob run`: the whole lifecycle as local processes, with injected faults.

Determinism conditions for the bit-identical comparisons: same job file, same layout and world
size, CPU, OMP_NUM_THREADS=1, fp32. Under those the trainer restores model, optimizer, scheduler,
data position and RNG state exactly, so a resumed run repeats the uninterrupted run's numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from llamajob.jobfile import load_job, parse_job
from llamajob.local import observed_pod_from_process
from llamajob.local_cli import scaled_down
from llamajob.observed import Observed
from llamajob.plan import make_plan
from llamajob.reconcile import reconcile
from llamajob.render import CONTAINER, labels, observed_pod, pod_name

pytestmark = pytest.mark.slow

LLAMAJOB_RUN = (sys.executable, "-m", "llamajob.cli", "run")
STEPS = 40
EVERY = 10


def _job_yaml(tmp: Path, data_dir: Path, name: str = "t", process_restarts: int = 0) -> Path:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["metadata"]["name"] = name
    spec = obj["spec"]
    spec["restartPolicy"]["processRestarts"] = process_restarts
    spec["maxSteps"] = STEPS
    spec["data"]["path"] = str(data_dir)
    spec["checkpoint"].update(dir=str(tmp / "ckpt"), everySteps=EVERY, keep=2)
    spec["compile"]["cacheDir"] = str(tmp / "cache")
    spec["restartPolicy"].update(backoffSeconds=0, hangTimeoutSeconds=300)
    # Validation on: a resumed run must also repeat the validation losses exactly.
    spec["validation"] = {"sequences": 2 * spec["batch"]["globalBatchSize"], "everySteps": EVERY}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "pydoc"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "llamajob.cli",
            "prepare-data",
            "--output",
            str(out),
            "--seq-length",
            "128",
            "--no-progress",
        ],
        check=True,
        timeout=300,
    )
    return out


def _run(tmp: Path, job: Path, *extra: str, timeout: float = 600) -> tuple[dict[str, Any], str]:
    summary = tmp / "summary.json"
    res = subprocess.run(
        [
            *LLAMAJOB_RUN,
            str(job),
            "--no-progress",
            "--summary-json",
            str(summary),
            "--run-dir",
            str(tmp / "run"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        check=False,
    )
    assert summary.exists(), res.stdout + res.stderr
    return json.loads(summary.read_text()), res.stdout + res.stderr


def _losses(tmp: Path) -> dict[int, float | tuple[float, float]]:
    """step -> loss (and validation loss on the steps that have one) of the last attempt that
    logged the step."""
    out: dict[int, float | tuple[float, float]] = {}
    for line in (tmp / "run" / "steps.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = (
            (rec["loss"], rec["validation_loss"]) if "validation_loss" in rec else rec["loss"]
        )
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("baseline")
    summary, out = _run(tmp, _job_yaml(tmp, dataset))
    assert summary["phase"] == "Succeeded", out
    return {"summary": summary, "losses": _losses(tmp), "checkpoints": tmp / "ckpt"}


def test_uninterrupted_run_succeeds_and_loss_falls(baseline: dict[str, Any]) -> None:
    s, losses = baseline["summary"], baseline["losses"]
    assert s["restarts"] == 0 and s["final_step"] == STEPS
    assert sorted(losses) == list(range(1, STEPS + 1))
    validated = {step: v for step, v in losses.items() if isinstance(v, tuple)}
    assert sorted(validated) == list(range(EVERY, STEPS + 1, EVERY))
    assert validated[STEPS][0] < losses[1] - 1.0, losses  # type: ignore[operator]
    assert s["final_validation_loss"] == validated[STEPS][1] < validated[EVERY][1]
    assert s["checkpoints"] == [f"step_{STEPS - EVERY}", f"step_{STEPS}"]  # keep: 2


def test_kill_at_step_resumes_to_the_same_loss(
    tmp_path: Path, dataset: Path, baseline: dict[str, Any]
) -> None:
    summary, out = _run(tmp_path, _job_yaml(tmp_path, dataset), "--chaos-kill-at-step", "25")
    assert summary["phase"] == "Succeeded", out
    assert summary["restarts"] == 1
    assert summary["faults"][0]["attempt"] == 1
    assert summary["final_loss"] == baseline["summary"]["final_loss"]  # bit-identical
    assert summary["final_validation_loss"] == baseline["summary"]["final_validation_loss"]
    assert _losses(tmp_path) == baseline["losses"]
    # Attempt 2 resumed from step 20 (the newest complete checkpoint), not from scratch.
    second = (tmp_path / "run" / "attempt-2" / "train.log").read_text()
    assert "resumed from step_20 " in second, second[-3000:]


def test_process_restart_in_place_needs_no_new_attempt(
    tmp_path: Path, dataset: Path, baseline: dict[str, Any]
) -> None:
    job = _job_yaml(tmp_path, dataset, process_restarts=1)
    summary, out = _run(tmp_path, job, "--chaos-kill-at-step", "25")
    assert summary["phase"] == "Succeeded", out
    assert summary["restarts"] == 0 and summary["faults"] == []  # torchrun handled it
    assert summary["process_restarts"] == 1  # rank 0's metric, through the status
    assert summary["final_loss"] == baseline["summary"]["final_loss"]
    assert _losses(tmp_path) == baseline["losses"]
    log = (tmp_path / "run" / "attempt-1" / "train.log").read_text()
    assert "chaos: injecting killAtStep (25)" in log
    assert "torchrun restarted the processes in place (1 time(s) in this attempt)" in log
    assert "resumed from step_20 " in log, log[-3000:]
    assert not (tmp_path / "run" / "attempt-2").exists()


def test_damaged_checkpoints_fail_the_job_without_retries(
    tmp_path: Path, dataset: Path, baseline: dict[str, Any]
) -> None:
    """A permanent error in training (the compile step never loads checkpoints) is neither
    restarted in place nor by a new attempt: the job fails, naming the damaged files. (One
    damaged checkpoint among good ones is not an error: tests/test_checkpoint_faults.py.)"""
    shutil.copytree(baseline["checkpoints"], tmp_path / "ckpt")
    steps = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    shards = [sorted((tmp_path / "ckpt" / step / "state").glob("*.distcp"))[0] for step in steps]
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[:100])
    summary, out = _run(tmp_path, _job_yaml(tmp_path, dataset, process_restarts=2))
    assert summary["phase"] == "Failed", out
    assert summary["restarts"] == 0 and summary["process_restarts"] == 0
    assert "holds no intact checkpoint to resume from" in summary["message"], summary
    assert f"step_{STEPS} (state/{shards[0].name} has 100 bytes" in summary["message"], summary
    assert not (tmp_path / "run" / "attempt-2").exists()
    log = (tmp_path / "run" / "attempt-1" / "train.log").read_text()
    assert log.count("failed (exitcode: 65)") == 3, log[-3000:]  # torchrun's three rounds
    assert "error (an earlier round of this process group" in log, log[-3000:]
    # Moved aside as found, for the user to look at; nothing deleted.
    kept = sorted((tmp_path / "ckpt" / "quarantine").glob("step_*/state/*.distcp"))
    assert [p.stat().st_size for p in kept if p.name == shards[0].name] == [100] * len(steps)


def test_kill_during_checkpoint_write_resumes_from_a_complete_checkpoint(
    tmp_path: Path, dataset: Path, baseline: dict[str, Any]
) -> None:
    job = _job_yaml(tmp_path, dataset)
    summary, out = _run(tmp_path, job, "--chaos-kill-during-checkpoint", "20")
    assert summary["phase"] == "Succeeded", out
    assert summary["restarts"] == 1
    assert summary["final_loss"] == baseline["summary"]["final_loss"]
    assert _losses(tmp_path) == baseline["losses"]
    # The torn step_20 was skipped: attempt 2 resumed from step_10, the last complete one.
    second = (tmp_path / "run" / "attempt-2" / "train.log").read_text()
    assert "resumed from step_10 " in second, second[-3000:]
    ckpt = tmp_path / "ckpt"
    leftovers = [p.name for p in ckpt.iterdir() if p.is_dir() and not (p / "done").exists()]
    assert leftovers == [], leftovers


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _like_a_terminal_foreground_process() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and an
    # ignored signal stays ignored across exec (Python then installs no KeyboardInterrupt
    # handler). A user's Ctrl-C reaches a foreground process with the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_everything_and_a_rerun_resumes(tmp_path: Path, dataset: Path) -> None:
    job = _job_yaml(tmp_path, dataset)
    proc = subprocess.Popen(
        [
            *LLAMAJOB_RUN,
            str(job),
            "--no-progress",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_like_a_terminal_foreground_process,
    )
    first_done = tmp_path / "ckpt" / f"step_{EVERY}" / "done"
    deadline = time.monotonic() + 300
    while not first_done.exists():
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "interrupted" in output
    time.sleep(0.5)
    assert _processes_mentioning(str(tmp_path / "run")) == [], "orphan processes left behind"

    # The ranks saved the step they were at when stopped (checkpoint.saveOnTerminate).
    reached = max(_losses(tmp_path))
    assert f"SIGTERM: saving step_{reached} before exiting" in _train_log(tmp_path)

    summary, out = _run(tmp_path, job)
    assert summary["phase"] == "Succeeded", out
    # The rerun's log starts afresh: it must hold exactly the steps after the saved one.
    lines = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(reached + 1, STEPS + 1)), f"not resumed at step {reached}"


def _train_log(tmp: Path) -> str:
    return "".join(p.read_text() for p in sorted((tmp / "run").glob("attempt-*/train.log")))


def _run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`llamajob run` for the cases that stop before any training starts."""
    return subprocess.run(
        [*LLAMAJOB_RUN, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def test_trainium_job_is_refused_with_a_hint(tmp_path: Path) -> None:
    res = _run_cli(tmp_path, str(ROOT / "examples" / "llama3-70b.yaml"))
    assert res.returncode == 2
    assert "Local runs use the torch backend on CPU" in res.stderr and "--scale-down" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_suspended_job_is_refused_and_nothing_starts(tmp_path: Path) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["spec"]["suspend"] = True
    path = tmp_path / "suspended.yaml"
    path.write_text(yaml.safe_dump(obj))
    res = _run_cli(tmp_path, str(path))
    assert res.returncode == 2
    assert res.stderr.startswith("error: spec.suspend: ") and "set it to false" in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["llama3-70b", "llama3-8b"])
def test_scaled_down_job_keeps_the_family_and_is_valid(name: str) -> None:
    job = load_job(ROOT / "examples" / f"{name}.yaml")
    small = scaled_down(job)
    big, tiny = job.spec.model.architecture(), small.spec.model.architecture()
    assert big.num_heads // big.num_kv_heads == tiny.num_heads // tiny.num_kv_heads
    assert tiny.rope_theta == big.rope_theta
    assert make_plan(small.spec).valid
    assert small.spec.cluster.instance_type == "cpu"


def test_scaled_down_name_stays_a_valid_name() -> None:
    job = load_job(ROOT / "examples" / "llama3-8b.yaml")
    longest = "a" * 246 + "-" + "b" * 6  # 253 characters, the most Kubernetes allows
    renamed = job.model_copy(update={"metadata": job.metadata.model_copy(
        update={"name": longest})})
    small = scaled_down(renamed)
    assert len(small.metadata.name) <= 253 and small.metadata.name.endswith("a-local")


def test_invalid_job_gives_the_planner_messages(tmp_path: Path) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["spec"]["parallelism"]["tensor"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(obj))
    res = _run_cli(tmp_path, str(path))
    assert res.returncode == 2
    assert "spec.parallelism.tensor: 3 does not divide" in res.stderr


# --- one core, two shells: the same observation gives the same decision -----------------------
def _k8s_pod(job_name: str, exit_code: int | None, message: str | None) -> dict[str, Any]:
    job = parse_job(yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text()))
    if exit_code is None:
        phase, state = "Running", {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    else:
        phase = "Succeeded" if exit_code == 0 else "Failed"
        term: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
        }
        if message is not None:
            term["message"] = message
        state = {"terminated": term}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job_name, "train", 1, 0),
            "labels": labels(job, role="train", attempt=1, rank=0),
        },
        "spec": {"nodeName": "localhost"},
        "status": {
            "phase": phase,
            "podIP": "127.0.0.1",
            "containerStatuses": [{"name": CONTAINER, "state": state}],
        },
    }


SHELL_TABLE = [
    ("running", None, None),
    ("worker crashed (torchrun exits 1)", 1, None),
    ("killed by SIGKILL", 137, None),
    ("permanent exit code", 78, None),
    (
        "permanent via termination message",
        1,
        {"permanent": True, "reason": "ConfigError", "message": "spec.data.path: missing"},
    ),
    ("finished", 0, None),
]


@pytest.mark.parametrize(
    ("case", "exit_code", "message"), SHELL_TABLE, ids=[row[0] for row in SHELL_TABLE]
)
def test_local_and_kubernetes_shells_decide_alike(
    case: str, exit_code: int | None, message: dict[str, Any] | None
) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["spec"]["compile"]["enabled"] = False  # straight to training for this comparison
    job = parse_job(obj)
    text = json.dumps(message) if message is not None else None
    from_k8s = observed_pod(_k8s_pod(job.metadata.name, exit_code, text))
    from_local = observed_pod_from_process(
        name=pod_name(job.metadata.name, "train", 1, 0),
        role="train",
        attempt=1,
        rank=0,
        exit_code=exit_code,
        termination_message=message or {},
    )
    assert from_k8s == from_local

    # Drive the core to "training, gang formed", then compare the two shells' decisions.
    now = datetime(2026, 1, 1, tzinfo=UTC)
    running = observed_pod(_k8s_pod(job.metadata.name, None, None))
    assert running is not None
    status = None
    for _ in range(4):
        job = job.model_copy(update={"status": status})
        base = Observed(pods=(running,), service=True)
        status = reconcile(job, base, now).status
    job = job.model_copy(update={"status": status})
    assert status is not None and status.phase == "Training"
    d_k8s = reconcile(job, Observed(pods=(from_k8s,), service=True), now)
    d_local = reconcile(job, Observed(pods=(from_local,), service=True), now)
    assert d_k8s == d_local


def test_console_prints_log_text_with_brackets_literally(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Status messages quote pod logs; a gloo line like "[/.../pair.cc:152] ..." once crashed
    the runner as a rich markup error."""
    from llamajob.api import LlamaTrainingJobStatus
    from llamajob.local_console import ConsoleUI, print_summary

    ui = ConsoleUI(enabled=False)
    quoted = "exit code 1: [/__w/pytorch/third_party/gloo/pair.cc:152] timed out [bold]"
    ui.phase(LlamaTrainingJobStatus(phase="Restarting", message=quoted))
    ui.event("Warning", "PodFailed", quoted)
    ui.note(quoted)
    print_summary(ui, {"job": "t", "phase": "Failed", "message": quoted, "final_step": 1,
                       "max_steps": 2, "final_loss": None, "restarts": 0,
                       "wall_seconds": 1.0, "checkpoints": [], "checkpoint_dir": "c"})
    assert capsys.readouterr().out.count(quoted) == 4


# --- data.path: the built-in corpus only where documented --------------------------------------


def _tiny_with(tmp: Path, data_path: str, **spec: Any) -> Path:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["spec"]["data"]["path"] = data_path
    obj["spec"]["model"].update(spec.pop("model", {}))
    obj["spec"].update(spec)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


def _assert_refused(res: subprocess.CompletedProcess[str], *fragments: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out and res.stdout == "", out
    (line,) = res.stderr.splitlines()
    assert line.startswith("error: spec.data."), line
    for fragment in fragments:
        assert fragment in line, line


def test_mistyped_data_path_is_refused_before_anything_starts(tmp_path: Path) -> None:
    job = _tiny_with(tmp_path, "data/pydocs")
    res = _run_cli(tmp_path, str(job), "--no-progress")
    _assert_refused(res, "spec.data.path: data/pydocs does not exist",
                    "llamajob prepare-data", "--output data/pydocs", "data/pydoc")
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_directory_without_a_dataset_is_refused(tmp_path: Path, content: str | None) -> None:
    data = tmp_path / "corpus"
    data.mkdir()
    if content:
        (data / content).write_text("raw text, not a prepared dataset")
    job = _tiny_with(tmp_path, str(data))
    res = _run_cli(tmp_path, str(job), "--no-progress")
    what = "is empty" if content is None else "holds no prepared dataset"
    _assert_refused(res, f"spec.data.path: {data} {what}", "llamajob prepare-data",
                    "--builtin-corpus")
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in data.iterdir()) == ([content] if content else [])


def test_dataset_of_another_sequence_length_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    data.mkdir()
    (data / "metadata.json").write_text(json.dumps({"seq_length": 64}))
    res = _run_cli(tmp_path, str(_tiny_with(tmp_path, str(data))), "--no-progress")
    _assert_refused(res, "spec.data.seqLength: 128", "--seq-length 64", "seqLength: 64")


def test_dataset_smaller_than_a_batch_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    data.mkdir()
    (data / "metadata.json").write_text(json.dumps({"seq_length": 128, "num_sequences": 40}))
    res = _run_cli(tmp_path, str(_tiny_with(tmp_path, str(data))), "--no-progress")
    _assert_refused(res, f"spec.data.path: {data} holds 40 sequences, fewer than one global "
                    "batch (16) plus validation.sequences (64)", "llamajob prepare-data")
    assert not (tmp_path / "runs").exists()


def test_builtin_corpus_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepared automatically for data/pydoc (any spelling of it), elsewhere only when asked,
    never over someone's files, never for a job with its own tokenizer."""
    from llamajob.local_cli import DataProblem, check_dataset

    monkeypatch.chdir(tmp_path)

    def job(path: str, **spec: Any) -> Any:
        return load_job(_tiny_with(tmp_path, path, **spec))

    assert check_dataset(job("data/pydoc")) is True
    assert check_dataset(job("./data//pydoc")) is True
    with pytest.raises(DataProblem, match="does not exist"):
        check_dataset(job("elsewhere"))
    assert check_dataset(job("elsewhere"), builtin=True) is True
    with pytest.raises(DataProblem, match=r"byte-level tokenizer, not model\.tokenizer"):
        check_dataset(job("data/pydoc", model={"tokenizer": "tok/tokenizer.json"}))
    # What an interrupted prepare-data leaves is prepared again; other files are not touched.
    (tmp_path / "data" / "pydoc").mkdir(parents=True)
    (tmp_path / "data" / "pydoc" / "tokens.bin.tmp").write_bytes(b"\0")
    assert check_dataset(job("data/pydoc")) is True
    (tmp_path / "data" / "pydoc" / "mine.txt").write_text("x")
    with pytest.raises(DataProblem, match="holds no prepared dataset"):
        check_dataset(job("data/pydoc"))
    (tmp_path / "data" / "pydoc" / "metadata.json").write_text(json.dumps({"seq_length": 128}))
    assert check_dataset(job("data/pydoc")) is False  # ready: nothing to prepare


def test_summary_says_when_no_step_ran() -> None:
    from llamajob.local_console import steps_line

    assert steps_line({"final_step": 12, "max_steps": 200}) == "12/200"
    line = steps_line({"final_step": None, "max_steps": 2, "phase": "Failed"})
    assert "None" not in line and line.startswith("0/2 (no training step ran") and "Failed" in line


def test_builtin_corpus_is_prepared_at_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamajob.local_cli import check_dataset, prepare_builtin_corpus
    from llamajob.local_console import ConsoleUI

    monkeypatch.chdir(tmp_path)
    job = load_job(_tiny_with(tmp_path, "data/pydoc"))
    assert check_dataset(job) is True
    assert prepare_builtin_corpus(job, ConsoleUI(enabled=False)) == 0
    assert check_dataset(job) is False
    meta = json.loads((tmp_path / "data" / "pydoc" / "metadata.json").read_text())
    assert meta["sources"] == ["builtin:pydoc"] and meta["seq_length"] == 128
