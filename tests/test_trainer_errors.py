"""User errors of `llamajob train`: one clear line, the protocol exit code, a permanent
termination message, and no checkpoint touched.

These checks run before the trainer joins a process group, so `train_main` runs in-process.
"""

from __future__ import annotations

import errno
import json
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from llamajob_trainer import protocol
from llamajob_trainer.checkpoint import CheckpointManager
from llamajob_trainer.cli import _as_user_error, train_main
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.errors import ConfigError, DataError
from llamajob_trainer.model import Llama
from trainer_helpers import (
    prepare_pydoc,
    tiny_config,
    trainer_argv,
    trainer_env,
    tree_fingerprint,
    write_config,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_pydoc(tmp_path_factory.mktemp("data") / "pydoc")


@pytest.fixture
def term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination.json"
    monkeypatch.setenv(protocol.TERMINATION_LOG_ENV, str(path))
    return path


def run(tmp_path: Path, cfg: dict[str, Any], *extra: str) -> int:
    return train_main(["--config", str(write_config(tmp_path / "cfg.yaml", cfg)), *extra])


def assert_permanent(
    code: int, expected: int, term: Path, capsys: pytest.CaptureFixture[str], *needles: str
) -> str:
    err = capsys.readouterr().err
    assert code == expected, err
    assert err.startswith("llamajob train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    message = json.loads(term.read_text())
    assert message["permanent"] is True and message["message"] in err
    return err


def make_checkpoint(wire: dict[str, Any], step: int) -> Path:
    """What a one-rank run saves, written directly (no process group needed)."""
    cfg = TrainerConfig.model_validate(wire)
    model = Llama(cfg.model.architecture())
    model.init_weights(cfg.seed)
    opt = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(
        cfg.checkpoint.dir, keep=2, fingerprint=cfg.training_fingerprint(), log=lambda s: None
    )
    manager.save(step, [model], [opt], {"data": {"consumed_samples": step * 8}})
    return Path(cfg.checkpoint.dir)


def test_missing_dataset(tmp_path: Path, term: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path / "no-such-data", tmp_path / "ckpt")
    err = assert_permanent(run(tmp_path, cfg), protocol.EXIT_DATA, term, capsys,
                           "no-such-data does not exist", "llamajob prepare-data")
    assert json.loads(term.read_text())["reason"] == "DataError"
    assert "data.path" in err


def test_unreadable_tokenizer(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{definitely not a tokenizer")
    cfg = tiny_config(data, tmp_path / "ckpt", model={"tokenizer": str(bad)})
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_CONFIG, term, capsys,
                     "model.tokenizer: cannot read tokenizer")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"data": {"seqLength": 32}}, "packed with seq_length 64"),
        ({"model": {"vocabSize": 200}}, "259 ids but the model's vocabulary is 200"),
    ],
)
def test_dataset_does_not_fit_the_model(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str],
    override: dict[str, Any], needle: str,
) -> None:
    cfg = tiny_config(data, tmp_path / "ckpt", **override)
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_CONFIG, term, capsys, needle)


def test_validation_that_leaves_nothing_to_train_on(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(data, tmp_path / "ckpt", validation={"sequences": 800_000})
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_DATA, term, capsys,
                     "validation.sequences (800000) leaves fewer than one global batch (8)",
                     "lower validation.sequences")


def test_invalid_config_and_usage(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(data, tmp_path / "ckpt", batch={"microBatchSize": 0})
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_CONFIG, term, capsys,
                     "batch.microBatchSize: Input should be greater than or equal to 1")
    cfg = tiny_config(data, tmp_path / "ckpt", optimiser={"lr": 1})
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_CONFIG, term, capsys,
                     "optimiser: Extra inputs are not permitted")
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    assert_permanent(train_main(["--config", str(tmp_path / "broken.yaml")]),
                     protocol.EXIT_CONFIG, term, capsys, "not valid YAML/JSON")
    assert train_main(["--config", str(tmp_path / "c.yaml"), "--bogus"]) == protocol.EXIT_USAGE
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_corrupted_checkpoint_is_reported_not_replaced(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(data, tmp_path / "ckpt")
    ckpt = make_checkpoint(cfg, 4)
    shard = next((ckpt / "step_4" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = tree_fingerprint(ckpt)
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_DATA, term, capsys,
                     "holds no intact checkpoint to resume from: step_4 (state/__0_0.distcp has",
                     "Nothing was deleted")
    assert json.loads(term.read_text())["reason"] == "CheckpointCorrupt"
    assert_quarantined_untouched(ckpt, before)


def assert_quarantined_untouched(ckpt: Path, before: dict[str, tuple[int, float]]) -> None:
    """Every file of the damaged step_4 is in quarantine/, as it was (size and mtime)."""
    (moved,) = (ckpt / "quarantine").iterdir()
    assert moved.name.startswith("step_4.")
    after = {f"step_4/{rel}": v for rel, v in tree_fingerprint(moved).items()
             if rel != "QUARANTINED.txt"}
    assert after == {rel: v for rel, v in before.items() if rel.startswith("step_4/")}


def test_checkpoint_of_another_model_is_refused(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = make_checkpoint(tiny_config(data, tmp_path / "ckpt"), 4)
    before = tree_fingerprint(ckpt)
    bigger = tiny_config(data, tmp_path / "ckpt", model={"numLayers": 3})
    assert_permanent(run(tmp_path, bigger), protocol.EXIT_CONFIG, term, capsys,
                     "written for a different model")
    assert tree_fingerprint(ckpt) == before


@pytest.mark.parametrize(
    ("resume", "needle"),
    [(8, "asks for step 8 but"), ("none", "already holds checkpoints (newest step_4)")],
)
def test_resume_requests_that_cannot_be_honoured(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str],
    resume: int | str, needle: str,
) -> None:
    cfg = tiny_config(data, tmp_path / "ckpt", checkpoint={"resume": resume})
    ckpt = make_checkpoint(cfg, 4)
    before = tree_fingerprint(ckpt)
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_CONFIG, term, capsys, needle)
    assert tree_fingerprint(ckpt) == before


@pytest.mark.parametrize("command", ["train", "compile"])
def test_neuron_backend_without_the_neuron_sdk(
    tmp_path: Path, data: Path, term: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Trainium itself cannot run here; what can be checked is the clear, permanent failure."""
    from llamajob_trainer.cli import compile_main

    cfg = tiny_config(data, tmp_path / "ckpt", resolvedBackend="nxd")
    main = train_main if command == "train" else compile_main
    code = main(["--config", str(write_config(tmp_path / "cfg.yaml", cfg))])
    err = capsys.readouterr().err
    assert code == protocol.EXIT_DEPENDENCY, err
    assert err.startswith(f"llamajob {command}: error: backend 'neuron' needs torch_xla")
    message = json.loads(term.read_text())
    assert message["permanent"] is True and message["reason"] == "MissingDependency"


# --- in-place restarts (restartPolicy.processRestarts) -----------------------------------------


def test_a_restarted_round_repeats_an_earlier_permanent_error_without_running(
    tmp_path: Path, term: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = tiny_config(tmp_path / "no-such-data", tmp_path / "ckpt")
    config = write_config(tmp_path / "cfg.yaml", cfg)
    assert train_main(["--config", str(config)]) == protocol.EXIT_DATA
    first = capsys.readouterr().err
    assert json.loads(term.read_text())["exitCode"] == protocol.EXIT_DATA

    # torchrun's next round: the work is not repeated. Without the config file it would fail
    # differently (exit 78, "cannot read it") if it ran at all.
    config.unlink()
    monkeypatch.setenv(protocol.TORCHELASTIC_RESTART_COUNT_ENV, "1")
    assert train_main(["--config", str(config)]) == protocol.EXIT_DATA
    err = capsys.readouterr().err
    assert err.startswith("llamajob train: error (an earlier round of this process group")
    assert first.removeprefix("llamajob train: error: ").strip() in err
    assert "cannot read it" not in err


@pytest.mark.parametrize("restart_count", ["0", "1"])
def test_a_round_runs_unless_an_earlier_one_failed_permanently(
    tmp_path: Path, term: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, restart_count: str,
) -> None:
    """Round 0 never trusts the log (a fresh container's is empty); a transient failure (a
    crash, permanent: false) in an earlier round is what in-place restarts are for."""
    stale = {"permanent": restart_count == "0", "exitCode": protocol.EXIT_CONFIG,
             "reason": "InvalidConfig", "message": "stale"}
    term.write_text(json.dumps(stale))
    monkeypatch.setenv(protocol.TORCHELASTIC_RESTART_COUNT_ENV, restart_count)
    cfg = tiny_config(tmp_path / "no-such-data", tmp_path / "ckpt")
    assert_permanent(run(tmp_path, cfg), protocol.EXIT_DATA, term, capsys, "no-such-data")


def test_torchrun_does_not_retry_a_corrupted_checkpoint(tmp_path: Path, data: Path) -> None:
    """The error the compile step cannot catch: a checkpoint damaged after it was written. With
    --max-restarts 2 both rounds after the first end at once with the first round's error."""
    cfg = tiny_config(data, tmp_path / "ckpt")
    ckpt = make_checkpoint(cfg, 4)
    shard = next((ckpt / "step_4" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = tree_fingerprint(ckpt)
    argv = trainer_argv("train", write_config(tmp_path / "cfg.yaml", cfg), 2)
    argv[argv.index("--max-restarts") + 1] = "2"
    proc = subprocess.run(argv, env=trainer_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    # torchrun stops a round's other rank when one fails, so a rank may not get to print.
    real = out.count("llamajob train: error: checkpoint.dir ")
    repeated = out.count("llamajob train: error (an earlier round")
    assert 1 <= real <= 2, out  # round 0 only
    assert repeated >= 2, out  # at least one rank in each of rounds 1 and 2
    assert out.count("failed (exitcode: 65)") == 3, out
    message = json.loads((tmp_path / "termination.json").read_text())
    assert message["permanent"] is True and message["reason"] == "CheckpointCorrupt"
    assert_quarantined_untouched(ckpt, before)


@pytest.mark.parametrize(
    ("exc", "kind", "needle"),
    [
        (OSError(errno.ENAMETOOLONG, "File name too long", "/ckpt/" + "x" * 300), ConfigError,
         "File name too long"),
        (OSError(errno.EACCES, "Permission denied", "/fsx/ckpt"), ConfigError, "/fsx/ckpt"),
        (pickle.UnpicklingError("invalid load key, 'x'."), DataError, "invalid load key"),
        (json.JSONDecodeError("Expecting value", "{", 1), DataError, "Expecting value"),
        (ValueError("embedded null byte"), ConfigError, "NUL byte"),
        (RuntimeError("Overflow when unpacking long"), ConfigError, "64 bits"),
    ],
)
def test_damaged_input_and_impossible_paths_are_permanent(
    exc: BaseException, kind: type, needle: str
) -> None:
    user = _as_user_error(exc)
    assert isinstance(user, kind) and needle in str(user)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error", "/fsx/ckpt"),  # a flaky file system: retry
        OSError(errno.ENOSPC, "No space left on device", "/fsx/ckpt"),
        RuntimeError("Connection reset by peer"),
        ValueError("something else"),
    ],
)
def test_what_a_retry_can_fix_stays_retryable(exc: BaseException) -> None:
    assert _as_user_error(exc) is None
