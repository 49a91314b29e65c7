"""`llamajob run` owns its process tree: however it dies, torchrun and the ranks die with it, and
a second concurrent run of the same job (or on the same checkpoints) is refused.

torchrun and each rank run in sessions of their own, so neither a signal to `llamajob run`'s
process group nor its death reaches them by itself; without care they would keep training and a
rerun would put a second gang on the same checkpoint directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import BIN
from test_local import LLAMAJOB_RUN, _job_yaml, _processes_mentioning
from test_local import dataset as dataset  # the module-scoped prepared corpus, shared

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 300
# torchrun forwards the stop to the ranks, which save their current step (small here) and exit.
STOP_TIMEOUT = 15

Start = Callable[..., subprocess.Popen[bytes]]


def _long_job(tmp: Path, data: Path, name: str = "t") -> Path:
    """The test_local job, straight to training and long enough to be running when killed;
    every job written under one `tmp` shares its checkpoint directory."""
    path = _job_yaml(tmp, data, name=name)
    obj = yaml.safe_load(path.read_text())
    obj["spec"]["maxSteps"] = 100_000
    obj["spec"]["compile"]["enabled"] = False
    obj["spec"].pop("validation")
    out = tmp / f"{name}.yaml"
    out.write_text(yaml.safe_dump(obj))
    return out


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts `llamajob run` in a session of its own; afterwards kills whatever any of them left
    behind (found by the test's directory in the command line), pass or fail."""
    started: list[subprocess.Popen[bytes]] = []

    def _start(job: Path, run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
        with (run_dir.parent / f"{run_dir.name}.out").open("ab") as out:
            proc = subprocess.Popen(
                [*LLAMAJOB_RUN, str(job), "--no-progress", "--run-dir", str(run_dir), *extra],
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for _ in range(50):
        left = _processes_mentioning(str(tmp_path))
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _output(run_dir: Path) -> str:
    path = run_dir.parent / f"{run_dir.name}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for_training(proc: subprocess.Popen[bytes], run_dir: Path) -> list[int]:
    """Waits for the first step record, then returns the job's processes: `llamajob run`,
    torchrun and the ranks (all name the run directory in their command lines)."""
    steps = run_dir / "steps.jsonl"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (steps.exists() and steps.read_text().strip()):
        assert proc.poll() is None, _output(run_dir)
        assert time.monotonic() < deadline, f"no step within {STARTUP_TIMEOUT} s"
        time.sleep(0.2)
    pids = _processes_mentioning(str(run_dir))
    # Not vacuous: `llamajob run`, torchrun and two ranks are there to be stopped.
    assert len(pids) >= 4, pids
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_until_gone(run_dir: Path) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT
    while left := _processes_mentioning(str(run_dir)):
        if time.monotonic() > deadline:
            lines = [_cmdline(pid)[:200] for pid in left]
            pytest.fail(f"left running {STOP_TIMEOUT} s after the stop: {left} {lines}")
        time.sleep(0.2)


@pytest.mark.parametrize("target", ["process group", "pid"])
def test_sigkill_of_llamajob_run_takes_torchrun_and_ranks_down(
    tmp_path: Path, dataset: Path, start: Start, target: str
) -> None:
    run_dir = tmp_path / "run"
    proc = start(_long_job(tmp_path, dataset), run_dir)
    _wait_for_training(proc, run_dir)
    if target == "pid":
        os.kill(proc.pid, signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    _wait_until_gone(run_dir)


def test_sigkill_of_torchrun_takes_its_ranks_down(
    tmp_path: Path, dataset: Path, start: Start
) -> None:
    run_dir = tmp_path / "run"
    proc = start(_long_job(tmp_path, dataset), run_dir)
    pids = _wait_for_training(proc, run_dir)
    torchrun = [pid for pid in pids if b"torch.distributed.run" in _cmdline(pid)]
    # torchrun's own command line names the rank's command too.
    ranks = [pid for pid in set(pids) - set(torchrun) if b"llamajob.cli\0train" in _cmdline(pid)]
    assert len(torchrun) == 1 and len(ranks) == 2, [_cmdline(pid) for pid in pids]
    os.kill(torchrun[0], signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    # Only these ranks: `llamajob run` starts a new attempt of its own meanwhile.
    while left := set(ranks) & set(_processes_mentioning(str(run_dir))):
        assert time.monotonic() < deadline, f"ranks {left} outlived their torchrun"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, _output(run_dir)
    _wait_until_gone(run_dir)


def test_sighup_stops_everything_like_ctrl_c(tmp_path: Path, dataset: Path, start: Start) -> None:
    run_dir = tmp_path / "run"
    proc = start(_long_job(tmp_path, dataset), run_dir)
    _wait_for_training(proc, run_dir)
    proc.send_signal(signal.SIGHUP)  # the terminal went away
    assert proc.wait(timeout=120) == 130, _output(run_dir)
    assert "interrupted" in _output(run_dir)
    _wait_until_gone(run_dir)
    # As on Ctrl-C, the ranks saved the step they were at.
    train_log = (run_dir / "attempt-1" / "train.log").read_text()
    assert "SIGTERM: saving step_" in train_log, train_log[-3000:]


def _refused(job: Path, run_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LLAMAJOB_RUN, str(job), "--no-progress", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def test_second_run_of_the_same_job_is_refused_while_the_first_runs(
    tmp_path: Path, dataset: Path, start: Start
) -> None:
    run_dir = tmp_path / "run"
    job = _long_job(tmp_path, dataset)
    first = start(job, run_dir)
    _wait_for_training(first, run_dir)

    second = _refused(job, run_dir, tmp_path)
    assert second.returncode == 2, second.stdout + second.stderr
    message = second.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(run_dir) in message and f"pid {first.pid}" in message, message

    # Another job file (another name, another run directory) on the same checkpoints.
    other = _long_job(tmp_path, dataset, name="t2")
    third = _refused(other, tmp_path / "run2", tmp_path)
    assert third.returncode == 2, third.stdout + third.stderr
    message = third.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(tmp_path / "ckpt") in message and f"pid {first.pid}" in message, message

    # The first run went on undisturbed: its step log was not reset by the refused ones.
    steps = run_dir / "steps.jsonl"
    before = len(steps.read_text().splitlines())
    time.sleep(3)
    assert first.poll() is None, _output(run_dir)
    assert len(steps.read_text().splitlines()) > before

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 130, _output(run_dir)
    _wait_until_gone(run_dir)

    # Once it has ended, the job runs again; stopped once it trains.
    steps.unlink()  # the rerun starts its own; wait for that one, not the first run's
    rerun = start(job, run_dir)
    _wait_for_training(rerun, run_dir)
    rerun.send_signal(signal.SIGTERM)
    assert rerun.wait(timeout=120) == 130, _output(run_dir)
    _wait_until_gone(run_dir)


def test_a_child_whose_parent_died_before_it_armed_the_signal_does_not_run() -> None:
    """The parent can die between the fork and the prctl: the kernel would then never send the
    signal, so the child must notice (its parent is no longer the one it was told) and stop."""
    from llamajob_trainer.lifeline import PARENT_ENV

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = str(gone.pid)  # not the children's parent (we are), as after the parent's death
    python = str(BIN / "python")
    as_torchrun = [python, "-m", "llamajob_trainer.lifeline", "/bin/echo", "ran"]
    as_rank = [python, "-c", "from llamajob_trainer.lifeline import die_with_launcher\n"
               "die_with_launcher(); print('ran')"]

    def run(argv: list[str], parent: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, **{PARENT_ENV: parent})
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    for argv, sig in ((as_torchrun, signal.SIGTERM), (as_rank, signal.SIGKILL)):
        alive = run(argv, str(os.getpid()))
        assert (alive.returncode, alive.stdout) == (0, "ran\n"), alive.stderr
        orphan = run(argv, dead)
        assert (orphan.returncode, orphan.stdout) == (-sig, ""), orphan.stderr
