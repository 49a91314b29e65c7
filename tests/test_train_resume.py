"""Real training runs of a tiny Llama on CPU (torchrun + gloo): learning, kill and resume.

Bit-identical resume holds under the conditions listed in `llamajob_trainer.train`'s docstring:
same layout and world size, same torch build and thread count (OMP_NUM_THREADS=1 here), CPU,
same training config. The FSDP -> single-rank test changes the layout on purpose, so there the
losses only agree to rounding.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from llamajob_trainer import protocol
from llamajob_trainer.metrics import metric_names, scrape_values
from trainer_helpers import (
    checkpoint_listing,
    free_port,
    losses,
    prepare_pydoc,
    run_trainer,
    tiny_config,
    trainer_argv,
    trainer_env,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_pydoc(tmp_path_factory.mktemp("data") / "pydoc")


class Baseline:
    """An uninterrupted 2-rank DDP run, scraped over HTTP while it trains."""

    def __init__(self, root: Path, data: Path) -> None:
        import subprocess

        self.root = root
        self.port = free_port()
        cfg = write_config(root / "cfg.yaml", tiny_config(data, root / "ckpt",
                                                          metricsPort=self.port))
        self.jsonl = root / "steps.jsonl"
        proc = subprocess.Popen(
            trainer_argv("train", cfg, 2, "--log-jsonl", str(self.jsonl)),
            env=trainer_env(root), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        self.scrapes: list[str] = []
        poller = threading.Thread(target=self._poll, args=(proc,), daemon=True)
        poller.start()
        try:
            self.output, _ = proc.communicate(timeout=150)
        finally:
            proc.kill()
        poller.join(timeout=5)
        self.returncode = proc.returncode
        self.losses = dict(losses(self.jsonl))

    def _poll(self, proc: object) -> None:
        url = f"http://127.0.0.1:{self.port}/metrics"
        while getattr(proc, "poll")() is None:  # noqa: B009 - Popen passed as object
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    text = resp.read().decode()
                if scrape_values(text).get(protocol.TRAIN_STEP, 0) >= 1:
                    self.scrapes.append(text)
            except OSError:
                pass
            time.sleep(0.2)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Baseline:
    return Baseline(tmp_path_factory.mktemp("baseline"), data)


def test_loss_falls_on_pydoc_text(baseline: Baseline) -> None:
    assert baseline.returncode == 0, baseline.output[-3000:]
    assert sorted(baseline.losses) == list(range(1, 17))
    first = baseline.losses[1]
    last = sum(baseline.losses[s] for s in (14, 15, 16)) / 3
    # ln(512) = 6.24 at init; byte-level English text is far more predictable than uniform.
    assert first > 6.0
    assert last < first - 1.5, baseline.losses
    assert "step 16/16 | loss" in baseline.output


def test_metrics_endpoint_serves_the_catalogue(baseline: Baseline) -> None:
    assert baseline.scrapes, "rank 0 never served metrics with step >= 1 while training"
    text = baseline.scrapes[-1]
    values = scrape_values(text)
    for name in metric_names():
        assert f"# TYPE {name} " in text, name
    assert 1 <= values[protocol.TRAIN_STEP] <= 16
    assert values[protocol.TRAIN_MAX_STEPS] == 16
    assert values[protocol.TRAIN_LOSS] == pytest.approx(
        baseline.losses[int(values[protocol.TRAIN_STEP])]
    )
    assert values[protocol.TRAIN_TOKENS_PER_SECOND] > 0
    assert 0 < values[protocol.TRAIN_MFU] < 1
    assert f'{protocol.TRAIN_STEP}{{job="tiny",namespace="tests"}}' in text
    assert values[f"{protocol.TRAIN_STEP_SECONDS}_count"] >= 1


def test_keep_newest_two(baseline: Baseline) -> None:
    assert checkpoint_listing(baseline.root / "ckpt") == {"step_12": True, "step_16": True}


def test_killed_then_resumed_is_bit_identical_and_torn_checkpoint_is_skipped(
    tmp_path: Path, data: Path, baseline: Baseline
) -> None:
    ckpt = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(data, ckpt))
    jsonl = tmp_path / "steps.jsonl"
    log = ("--log-jsonl", str(jsonl))

    # 1) SIGKILL right after step 6: step_4 is the newest complete checkpoint.
    first = run_trainer("train", cfg, tmp_path, 2, *log, "--chaos-kill-at-step", "6")
    assert first.returncode != 0
    assert [s for s, _ in losses(jsonl)] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_listing(ckpt) == {"step_4": True}
    fired = json.loads((ckpt / protocol.CHAOS_MARKER).read_text())
    assert fired == {"killAtStep": 6}

    # 2) Resume; die in the middle of writing step_8 (shards on disk, no `done`).
    second = run_trainer("train", cfg, tmp_path, 2, *log, "--chaos-kill-during-checkpoint")
    assert second.returncode != 0
    assert "resumed from step_4" in second.stdout
    assert checkpoint_listing(ckpt) == {".tmp-step_8": False, "step_4": True}
    assert (ckpt / ".tmp-step_8" / "state" / ".metadata").is_file()  # shards were written

    # 3) Resume again: from step_4 (never the torn step_8), which is cleaned up. This attempt
    # saves in the background (checkpoint settings do not change the numbers).
    background = tiny_config(data, ckpt, checkpoint={"asyncSave": True})
    cfg = write_config(tmp_path / "cfg.yaml", background)
    third = run_trainer("train", cfg, tmp_path, 2, *log)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "removing interrupted save .tmp-step_8" in third.stdout
    assert "resumed from step_4" in third.stdout
    assert "checkpoint step_12 started" in third.stdout
    assert checkpoint_listing(ckpt) == {"step_12": True, "step_16": True}

    records = losses(jsonl)
    assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, *range(5, 17)]
    # Every record, including the steps replayed after each kill, equals the uninterrupted run
    # bit for bit (JSON floats round-trip exactly).
    assert [(s, baseline.losses[s]) for s, _ in records] == records


def test_fsdp_two_ranks_resumes_on_one_rank(tmp_path: Path, data: Path, baseline: Baseline) -> None:
    ckpt = tmp_path / "ckpt"
    jsonl = tmp_path / "steps.jsonl"
    fsdp = write_config(tmp_path / "fsdp.yaml", tiny_config(data, ckpt, parallelism={"fsdp": True}))
    first = run_trainer("train", fsdp, tmp_path, 2, "--log-jsonl", str(jsonl),
                        "--chaos-kill-at-step", "8")
    assert first.returncode != 0
    assert "fsdp True" in first.stdout
    assert checkpoint_listing(ckpt) == {"step_4": True, "step_8": True}
    state = json.loads((ckpt / "step_8" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["layout"]["fsdp"] is True

    # Same job, one process, no FSDP: DCP reshards the FSDP shards into whole tensors.
    single = write_config(tmp_path / "single.yaml", tiny_config(data, ckpt))
    second = run_trainer("train", single, tmp_path, None, "--log-jsonl", str(jsonl))
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "world 1" in second.stdout and "resumed from step_8" in second.stdout
    resumed = [(s, loss) for s, loss in losses(jsonl) if s > 8]
    assert [s for s, _ in resumed] == list(range(9, 17))
    # Different reduction order (FSDP on 2 ranks vs one process), so equal only to rounding;
    # a fresh model would be back near ln(512) = 6.2.
    for step, loss in resumed:
        assert loss == pytest.approx(baseline.losses[step], abs=0.02), (step, loss)


def test_compile_validates_once_then_reports_cache_hit(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamajob_trainer.cli import compile_main
    from llamajob_trainer.config import TrainerConfig

    wire = tiny_config(data, tmp_path / "ckpt")
    cfg_path = write_config(tmp_path / "cfg.yaml", wire)
    key = TrainerConfig.model_validate(wire).compile_key("torch", None, "cpu")
    marker = protocol.compile_marker_path(wire["compile"]["cacheDir"], key)

    first = run_trainer("compile", cfg_path, tmp_path, None)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "compile step 1/1: loss" in first.stdout
    assert json.loads(marker.read_text())["compileKey"] == key
    message = json.loads((tmp_path / "termination.json").read_text())
    assert message["compileCached"] is False and message["compileKey"] == key

    # The cache-hit path needs no process group, so it runs in-process.
    term = tmp_path / "second.json"
    monkeypatch.setenv(protocol.TERMINATION_LOG_ENV, str(term))
    assert compile_main(["--config", str(cfg_path)]) == 0
    message = json.loads(term.read_text())
    assert message["compileCached"] is True and message["compileKey"] == key


def test_sigterm_saves_the_current_step_and_the_restart_resumes_there(
    tmp_path: Path, data: Path, baseline: Baseline
) -> None:
    """A pod deletion (node drain, preemption) costs no steps: SIGTERM to torchrun, as the
    kubelet sends it to a container's first process, makes both ranks save the step they are
    at; the rerun continues from it with the uninterrupted run's numbers."""
    import signal
    import subprocess

    ckpt = tmp_path / "ckpt"
    # No scheduled save before the end, so any checkpoint found is the SIGTERM one.
    cfg = write_config(tmp_path / "cfg.yaml",
                       tiny_config(data, ckpt, checkpoint={"everySteps": 100}))
    jsonl = tmp_path / "steps.jsonl"
    proc = subprocess.Popen(
        trainer_argv("train", cfg, 2, "--log-jsonl", str(jsonl)), env=trainer_env(tmp_path),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 150
        while not (jsonl.exists() and any(s >= 3 for s, _ in losses(jsonl))):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no step 3 within 150 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped = max(s for s, _ in losses(jsonl))
    assert proc.returncode != 0 and 3 <= stopped < 16, output[-3000:]
    assert f"SIGTERM: saving step_{stopped} before exiting" in output
    assert checkpoint_listing(ckpt) == {f"step_{stopped}": True}
    message = json.loads((tmp_path / "termination.json").read_text())
    assert message["reason"] == "Terminated" and message["permanent"] is False

    rerun = run_trainer("train", cfg, tmp_path, 2, "--log-jsonl", str(jsonl))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed from step_{stopped}" in rerun.stdout
    records = losses(jsonl)
    assert [s for s, _ in records] == list(range(1, 17)), "a step was lost or repeated"
    assert dict(records) == baseline.losses


def test_torch_compile_step_fills_the_cache_that_training_reuses(
    tmp_path: Path, data: Path
) -> None:
    """With compile.torchCompile the compile step is real work: Inductor compiles the blocks
    into compile.cacheDir, and the training process then loads every graph from there, the
    forward-only ones of validation included."""
    cache = tmp_path / "compile-cache"
    wire = tiny_config(
        data, tmp_path / "ckpt", maxSteps=3,
        compile={"cacheDir": str(cache), "torchCompile": True},
        validation={"sequences": 8, "everySteps": 2},
    )
    cfg_path = write_config(tmp_path / "cfg.yaml", wire)

    compiled = run_trainer("compile", cfg_path, tmp_path, None, timeout=300)
    assert compiled.returncode == 0, compiled.stdout[-2000:] + compiled.stderr[-2000:]
    hits, misses = _compile_report(compiled.stdout)
    assert (hits, misses > 0) == (0, True), compiled.stdout
    assert any((cache / "inductor").rglob("*")), "nothing written under cacheDir/inductor"
    assert "compile validation pass" in compiled.stdout

    trained = run_trainer("train", cfg_path, tmp_path, None, timeout=300)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    # Reported after the first step, then again after the first validation.
    assert _compile_report(trained.stdout) == (misses, 0), trained.stdout
    steps = [line for line in trained.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and "validation loss" in steps[1]


def _compile_report(stdout: str) -> tuple[int, int]:
    """(graphs from the cache, graphs compiled) from the trainer's last torch.compile line."""
    found = re.findall(r"torch\.compile: (\d+) graph\(s\) from the cache, (\d+) compiled", stdout)
    assert found, stdout[-2000:]
    return int(found[-1][0]), int(found[-1][1])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fresh_start_from_pretrained_weights_with_async_checkpoints(
    tmp_path: Path, data: Path
) -> None:
    import torch
    from llamajob_trainer.checkpoint import CheckpointManager
    from llamajob_trainer.config import TrainerConfig
    from llamajob_trainer.data import PackedDataset, global_batch_indices
    from llamajob_trainer.hf import export_checkpoint, load_pretrained
    from llamajob_trainer.model import Llama, loss_sum

    # Pretrained weights: a model initialised with another seed, exported to HF safetensors.
    wire = tiny_config(data, tmp_path / "ckpt", maxSteps=2,
                       checkpoint={"everySteps": 1, "asyncSave": True})
    cfg = TrainerConfig.model_validate(wire)
    arch = cfg.model.architecture()
    source = Llama(arch)
    source.init_weights(cfg.seed + 1000)
    CheckpointManager(tmp_path / "src", keep=1, fingerprint="x", log=lambda s: None).save(
        1, [source], [torch.optim.AdamW(source.parameters())], {}
    )
    hf_dir = export_checkpoint(tmp_path / "src", 1, arch, "x", tmp_path / "hf")

    wire["model"]["pretrained"] = str(hf_dir)
    config = write_config(tmp_path / "cfg.yaml", wire)
    jsonl = tmp_path / "steps.jsonl"
    out = run_trainer("train", config, tmp_path, None, "--log-jsonl", str(jsonl))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"fresh start from pretrained weights {hf_dir}" in out.stdout
    assert "checkpoint step_1 started" in out.stdout  # asynchronous
    assert checkpoint_listing(tmp_path / "ckpt") == {"step_1": True, "step_2": True}

    # Step 1's loss is the pretrained model's loss on the first global batch.
    model = Llama(arch)
    model.load_state_dict(load_pretrained(hf_dir, arch))
    dataset = PackedDataset(data)
    rows = torch.from_numpy(dataset.rows(global_batch_indices(len(dataset), cfg.seed, 0, 8)))
    with torch.no_grad():
        expected = loss_sum(model(rows[:, :-1]), rows[:, 1:]).item() / rows[:, 1:].numel()
    assert losses(jsonl)[0] == (1, pytest.approx(expected, rel=1e-5))
    fresh = Llama(arch)
    fresh.init_weights(cfg.seed)
    with torch.no_grad():
        unrelated = loss_sum(fresh(rows[:, :-1]), rows[:, 1:]).item() / rows[:, 1:].numel()
    assert abs(unrelated - expected) > 1e-3  # the check above can tell the two apart


def test_chaos_settings_from_flags_or_environment() -> None:
    from llamajob_trainer.chaos import ChaosConfig, chaos_from

    env = {protocol.CHAOS_KILL_AT_STEP_ENV: "12", protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV: "1"}
    assert chaos_from(None, None, env) == ChaosConfig(12, 0)
    assert chaos_from(3, None, env) == ChaosConfig(3, 0)  # the flag wins
    assert chaos_from(None, None, {}) == ChaosConfig(None, None)
    assert not chaos_from(None, None, {protocol.CHAOS_KILL_AT_STEP_ENV: "x"}).enabled
    at_20 = {protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV: "20"}
    assert chaos_from(None, None, at_20) == ChaosConfig(None, 20)
    assert chaos_from(None, 7, at_20) == ChaosConfig(None, 7)


def test_validation_loss_is_the_saved_models_loss_on_the_held_out_rows(
    tmp_path: Path, data: Path
) -> None:
    """2 ranks evaluate the held-out tail every 4 steps and at the end; the last figure is what
    one process computes from the checkpoint of that step on the last 16 rows."""
    import numpy as np
    import torch
    from llamajob_trainer.config import TrainerConfig
    from llamajob_trainer.data import PackedDataset
    from llamajob_trainer.hf import export_checkpoint, load_pretrained
    from llamajob_trainer.model import Llama, loss_sum

    wire = tiny_config(data, tmp_path / "ckpt", maxSteps=6, checkpoint={"everySteps": 6},
                       validation={"sequences": 16, "everySteps": 4})
    cfg = TrainerConfig.model_validate(wire)
    jsonl = tmp_path / "steps.jsonl"
    out = run_trainer("train", write_config(tmp_path / "cfg.yaml", wire), tmp_path, 2,
                      "--log-jsonl", str(jsonl))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    validation = {r["step"]: r["validation_loss"] for r in records if "validation_loss" in r}
    assert sorted(validation) == [4, 6]
    assert re.search(r"step 4/6 \|.*\| validation loss \d+\.\d{4}", out.stdout)

    arch = cfg.model.architecture()
    hf_dir = export_checkpoint(tmp_path / "ckpt", 6, arch, cfg.training_fingerprint(),
                               tmp_path / "hf")
    model = Llama(arch)
    model.load_state_dict(load_pretrained(hf_dir, arch))
    dataset = PackedDataset(data)
    rows = torch.from_numpy(dataset.rows(np.arange(len(dataset) - 16, len(dataset))))
    with torch.no_grad():
        expected = loss_sum(model(rows[:, :-1]), rows[:, 1:]).item() / rows[:, 1:].numel()
    assert validation[6] == pytest.approx(expected, rel=1e-5)
    assert validation[4] != pytest.approx(expected, rel=1e-3)  # step 4's model was another
