"""Which library the fp32 CPU linears run on (``LLAMAJOB_CPU_MATMUL=auto``): the timing and the
decision in ``cpu_linear``, the switch a resumed run makes to its checkpoint's library
(``train.resume_cpu_matmul``), and both in real training runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from llamajob_trainer import cpu_linear
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.model import Llama
from llamajob_trainer.presets import PRESETS
from llamajob_trainer.train import cpu_matmul_line, resume_cpu_matmul
from trainer_helpers import (
    checkpoint_listing,
    losses,
    prepare_pydoc,
    run_trainer,
    tiny_config,
    trainer_env,
    write_config,
)

needs_onednn = pytest.mark.skipif(not cpu_linear.available(), reason="torch built without oneDNN")
NAMES = {"oneDNN": "onednn", "torch.mm": "aten"}  # the log's names -> the recorded ones
TIMED = re.compile(
    r"CPU matmul: (oneDNN|torch\.mm) \(timed on this model's linear shapes: ([^)]*)\)"
)


# --- decide ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "library"),
    [
        ({"onednn": 1.0, "aten": 2.0}, "onednn"),  # oneDNN twice as fast
        ({"onednn": 0.95, "aten": 1.0}, "aten"),  # 5% faster: within the margin
        ({"onednn": 1.5, "aten": 1.0}, "aten"),  # slower
        ({"onednn": 1.0, "aten": 1.0}, "aten"),  # a tie goes to torch.mm
        ({"onednn": 1.0}, "aten"),  # torch.mm's time missing
        ({"aten": 1.0}, "aten"),  # oneDNN's time missing
        ({}, "aten"),
        # Exactly at the margin is not "more than" it; just inside it is.
        ({"onednn": 10.0 * (1 - cpu_linear.MARGIN), "aten": 10.0}, "aten"),
        ({"onednn": 10.0 * (1 - cpu_linear.MARGIN) * (1 - 1e-9), "aten": 10.0}, "onednn"),
    ],
)
def test_decide_takes_onednn_only_when_clearly_faster(
    seconds: dict[str, float], library: str
) -> None:
    assert cpu_linear.decide(seconds) == library


# --- timing_rows -------------------------------------------------------------------------------


def test_timing_rows_takes_a_small_micro_batch_as_is() -> None:
    assert cpu_linear.timing_rows([(64, 64), (64, 192)], 100) == 100
    assert cpu_linear.timing_rows([], 100) == 100


def test_timing_rows_is_capped_by_max_rows() -> None:
    assert cpu_linear.MAX_ROWS < 2 * 4096
    assert cpu_linear.timing_rows([(64, 64)], 2 * 4096) == cpu_linear.MAX_ROWS


def test_timing_rows_never_goes_below_min_rows() -> None:
    # Ten distinct capped shapes whose products alone exceed the budget at a few rows.
    many = [(4096, 4096 - i) for i in range(10)]
    assert cpu_linear.FLOP_BUDGET < 6 * 10 * 4000 * 4000 * cpu_linear.MIN_ROWS
    assert cpu_linear.timing_rows(many, 4096) == cpu_linear.MIN_ROWS
    # A micro-batch smaller than MIN_ROWS is timed at MIN_ROWS.
    assert cpu_linear.timing_rows([(64, 64)], 4) == cpu_linear.MIN_ROWS


def test_timing_rows_keeps_one_timing_within_the_flop_budget() -> None:
    # A 1024-wide layer set: attention 1024x1024, MLP 1024x2816 and back.
    shapes = [(1024, 1024)] * 4 + [(1024, 2816)] * 2 + [(2816, 1024)]
    work = 6 * (1024 * 1024 + 2 * 1024 * 2816)  # per row, each distinct shape once
    rows = cpu_linear.timing_rows(shapes * 32, 4096)  # repeats of a shape cost nothing more
    assert cpu_linear.MIN_ROWS < rows < cpu_linear.MAX_ROWS
    assert rows * work <= cpu_linear.FLOP_BUDGET < (rows + 1) * work
    assert cpu_linear.timing_rows(shapes, 4096) == rows


def test_wide_layers_are_timed_at_capped_sides() -> None:
    """A Llama 3 output projection (4096 x 128256) is timed as 4096 x 4096: the timing allocates
    a bounded matrix and its rows stay within the budget instead of falling to the floor."""
    side = cpu_linear.MAX_SIDE
    assert cpu_linear.timed_shape((4096, 128_256)) == (4096, side)
    assert cpu_linear.timed_shape((53_248, 16_384)) == (side, side)
    assert cpu_linear.timed_shape((1024, 3072)) == (1024, 3072)
    llama3_8b = [(4096, 4096)] * 2 + [(4096, 1024)] * 2 + [(4096, 14336)] * 2 + [(14336, 4096)]
    rows = cpu_linear.timing_rows(llama3_8b * 32 + [(4096, 128_256)], 8192)
    assert rows > cpu_linear.MIN_ROWS
    assert rows * 6 * (4096 * 4096 + 4096 * 1024) <= cpu_linear.FLOP_BUDGET


# --- measure, linear_shapes --------------------------------------------------------------------


@needs_onednn
def test_measure_times_both_libraries_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seconds = cpu_linear.measure([(64, 128), (128, 64), (64, 128)], 32)
    assert set(seconds) == {"onednn", "aten"}
    assert all(0 < s < 10 and math.isfinite(s) for s in seconds.values()), seconds
    assert torch.equal(torch.get_rng_state(), before)


@needs_onednn
def test_measure_weighs_a_shape_by_how_often_the_model_holds_it() -> None:
    shape = (256, 512)
    thrice = min(cpu_linear.measure([shape] * 3, 128)["aten"] for _ in range(3))
    once = min(cpu_linear.measure([shape], 128)["aten"] for _ in range(3))
    assert 1.5 * once < thrice < 6 * once, (thrice, once)


def test_linear_shapes_lists_every_linear_of_the_model() -> None:
    arch = PRESETS["tiny"]
    shapes = cpu_linear.linear_shapes(Llama(arch))
    assert len(shapes) == 7 * arch.num_layers + 1
    h, i = arch.hidden_size, arch.intermediate_size
    assert shapes.count((h, i)) == 2 * arch.num_layers  # gate and up
    assert shapes.count((i, h)) == arch.num_layers  # down
    assert shapes.count((h, arch.vocab_size)) == 1  # the output projection


# --- resume_cpu_matmul -------------------------------------------------------------------------


def fp32_model(monkeypatch: pytest.MonkeyPatch, library: str) -> object:
    """A world-of-one tiny model whose linears run on ``library`` (built pinned to oneDNN, so no
    timing; then switched), with the variable left unset (auto) afterwards."""
    from llamajob_trainer.parallel import init_distributed, parallelize

    monkeypatch.setenv(cpu_linear.ENV_VAR, "onednn")
    cfg = TrainerConfig.model_validate(
        {"batch": {"micro_batch_size": 1, "global_batch_size": 1}, "precision": "fp32"}
    )
    pm = parallelize(cfg, PRESETS["tiny"], init_distributed())
    assert pm.cpu_matmul == "onednn"
    pm.use_cpu_matmul(library)
    monkeypatch.delenv(cpu_linear.ENV_VAR)
    return pm


def flags(pm: object) -> set[bool]:
    return {
        m.onednn
        for part in pm.model_parts  # type: ignore[attr-defined]
        for m in part.modules()
        if isinstance(m, cpu_linear.Linear)
    }


@needs_onednn
@pytest.mark.parametrize("auto", ["", "auto"])
@pytest.mark.parametrize(("current", "recorded"), [("aten", "onednn"), ("onednn", "aten")])
def test_auto_resume_switches_to_the_checkpoints_library(
    monkeypatch: pytest.MonkeyPatch, current: str, recorded: str, auto: str
) -> None:
    pm = fp32_model(monkeypatch, current)
    if auto:
        monkeypatch.setenv(cpu_linear.ENV_VAR, auto)
    logged: list[str] = []
    resume_cpu_matmul(pm, recorded, logged.append)  # type: ignore[arg-type]
    assert pm.cpu_matmul == recorded  # type: ignore[attr-defined]
    assert flags(pm) == {recorded == "onednn"}
    assert logged == [
        f"CPU matmul: {cpu_linear.LIBRARY_NAMES[recorded]}, as the checkpoint was trained "
        "(timed choice was overridden "
        "for a bit-identical resume)"
    ]


@needs_onednn
def test_pinned_library_wins_over_the_checkpoints_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pm = fp32_model(monkeypatch, "onednn")
    monkeypatch.setenv(cpu_linear.ENV_VAR, "onednn")
    logged: list[str] = []
    resume_cpu_matmul(pm, "aten", logged.append)  # type: ignore[arg-type]
    assert pm.cpu_matmul == "onednn" and flags(pm) == {True}  # type: ignore[attr-defined]
    assert len(logged) == 1
    assert logged[0].startswith("CPU matmul: oneDNN (LLAMAJOB_CPU_MATMUL")
    assert "trained on torch.mm" in logged[0] and "only to rounding" in logged[0]


@needs_onednn
def test_pinned_aten_is_recorded_and_warns_on_a_onednn_checkpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llamajob_trainer.parallel import init_distributed, parallelize

    monkeypatch.setenv(cpu_linear.ENV_VAR, "aten")
    cfg = TrainerConfig.model_validate(
        {"batch": {"micro_batch_size": 1, "global_batch_size": 1}, "precision": "fp32"}
    )
    pm = parallelize(cfg, PRESETS["tiny"], init_distributed())
    logged: list[str] = []
    resume_cpu_matmul(pm, "onednn", logged.append)
    assert flags(pm) == {False}
    assert pm.cpu_matmul == "aten"
    assert len(logged) == 1 and "only to rounding" in logged[0]


@needs_onednn
@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize(("current", "recorded"), [("onednn", None), ("aten", None),
                                                   ("onednn", "onednn"), ("aten", "aten")])
def test_nothing_to_do_when_the_checkpoint_agrees_or_records_nothing(
    monkeypatch: pytest.MonkeyPatch, current: str, recorded: str | None, pinned: bool
) -> None:
    pm = fp32_model(monkeypatch, current)
    if pinned:
        monkeypatch.setenv(cpu_linear.ENV_VAR, current)
    logged: list[str] = []
    resume_cpu_matmul(pm, recorded, logged.append)  # type: ignore[arg-type]
    assert pm.cpu_matmul == current and flags(pm) == {current == "onednn"}  # type: ignore[attr-defined]
    assert logged == []


@needs_onednn
def test_unknown_recorded_library_is_kept_aside_and_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pm = fp32_model(monkeypatch, "aten")
    logged: list[str] = []
    resume_cpu_matmul(pm, "mkl", logged.append)  # type: ignore[arg-type]
    assert pm.cpu_matmul == "aten" and flags(pm) == {False}  # type: ignore[attr-defined]
    assert logged == ["checkpoint records CPU matmul 'mkl', unknown here; keeping aten"]


def test_no_library_no_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16-mixed (or tensor parallel, or another device): nothing chosen, nothing resumed."""
    from llamajob_trainer.parallel import init_distributed, parallelize

    monkeypatch.delenv(cpu_linear.ENV_VAR, raising=False)
    cfg = TrainerConfig.model_validate({"batch": {"micro_batch_size": 1, "global_batch_size": 1}})
    assert cfg.precision == "bf16-mixed"
    pm = parallelize(cfg, PRESETS["tiny"], init_distributed())
    logged: list[str] = []
    resume_cpu_matmul(pm, "onednn", logged.append)
    assert pm.cpu_matmul is None and flags(pm) == {False} and logged == []


def test_log_line_names_the_library_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.ENV_VAR, "onednn")
    assert cpu_matmul_line("onednn", {}) == "CPU matmul: oneDNN (set by LLAMAJOB_CPU_MATMUL)"
    # Untimed under auto: torch has no oneDNN, so torch.mm without a contest.
    monkeypatch.setenv(cpu_linear.ENV_VAR, "auto")
    assert cpu_matmul_line("aten", {}) == "CPU matmul: torch.mm (torch has no oneDNN kernel)"
    line = cpu_matmul_line("aten", {"onednn": 0.0025, "aten": 0.00075})
    assert line == ("CPU matmul: torch.mm (timed on this model's linear shapes: "
                    "torch.mm 0.8 ms, oneDNN 2.5 ms)")
    assert TIMED.search(line)


# --- real runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_pydoc(tmp_path_factory.mktemp("data") / "pydoc")


def auto_env(tmp: Path) -> dict[str, str]:
    """The tests' environment without the pin: LLAMAJOB_CPU_MATMUL unset means auto."""
    env = trainer_env(tmp)
    del env[cpu_linear.ENV_VAR]
    return env


def recorded(ckpt: Path, step: int) -> str | None:
    return json.loads((ckpt / f"step_{step}" / "trainer_state.json").read_text())["cpu_matmul"]


def grad_norms(jsonl: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["grad_norm"]) for r in map(json.loads, jsonl.read_text().splitlines())]


def final_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, read from its DCP shards without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent.parent / f"{step_dir.name}.pt"  # next to the checkpoint dir
    dcp_to_torch_save(step_dir / "state", out)
    return torch.load(out, weights_only=False)["model"]


def ok(proc: object) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]  # type: ignore[attr-defined]


@pytest.mark.slow
@needs_onednn
def test_auto_run_times_on_rank_0_and_records_its_choice(tmp_path: Path, data: Path) -> None:
    ckpt = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml",
                       tiny_config(data, ckpt, maxSteps=4, checkpoint={"everySteps": 2}))
    run = run_trainer("train", cfg, tmp_path, 2, env=auto_env(tmp_path))
    assert run.returncode == 0, ok(run)
    lines = [line for line in run.stdout.splitlines() if "CPU matmul:" in line]
    assert len(lines) == 1, lines  # rank 0 logs it, once
    timed = TIMED.search(lines[0])
    assert timed, lines[0]
    assert "oneDNN " in timed.group(2) and "torch.mm " in timed.group(2)
    library = NAMES[timed.group(1)]
    assert checkpoint_listing(ckpt) == {"step_2": True, "step_4": True}
    assert recorded(ckpt, 2) == recorded(ckpt, 4) == library


@pytest.mark.slow
@needs_onednn
def test_auto_resume_of_a_onednn_checkpoint_is_bit_identical(tmp_path: Path, data: Path) -> None:
    wire = tiny_config(data, tmp_path / "ckpt", maxSteps=6, checkpoint={"everySteps": 2})

    # The reference: uninterrupted, pinned to oneDNN (trainer_env pins it).
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_cfg = write_config(ref_dir / "cfg.yaml", {**wire, "checkpoint": {
        **wire["checkpoint"], "dir": str(ref_dir / "ckpt")}})
    ref = run_trainer("train", ref_cfg, ref_dir, 2, "--log-jsonl", str(ref_dir / "steps.jsonl"))
    assert ref.returncode == 0, ok(ref)
    assert "CPU matmul: oneDNN (set by LLAMAJOB_CPU_MATMUL)" in ref.stdout
    reference = dict(losses(ref_dir / "steps.jsonl"))
    assert sorted(reference) == list(range(1, 7))

    # Pinned to oneDNN, killed after step 3: step_2 is the checkpoint, recorded as oneDNN.
    ckpt = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "cfg.yaml", wire)
    jsonl = tmp_path / "steps.jsonl"
    first = run_trainer("train", cfg, tmp_path, 2, "--log-jsonl", str(jsonl),
                        "--chaos-kill-at-step", "3")
    assert first.returncode != 0, ok(first)
    assert checkpoint_listing(ckpt) == {"step_2": True}
    assert recorded(ckpt, 2) == "onednn"

    # Resumed with the variable unset (auto): it times, then takes the checkpoint's oneDNN.
    second = run_trainer("train", cfg, tmp_path, 2, "--log-jsonl", str(jsonl),
                         env=auto_env(tmp_path))
    assert second.returncode == 0, ok(second)
    assert "resumed from step_2" in second.stdout
    timed = TIMED.search(second.stdout)
    assert timed, ok(second)
    switched = "CPU matmul: oneDNN, as the checkpoint was trained" in second.stdout
    # On a CPU where the tiny model's shapes run faster on torch.mm (the Xeon this was written
    # on: oneDNN ~3x slower at these sizes) the resume must switch; where oneDNN wins the timing
    # already agrees with the checkpoint and there is nothing to say.
    assert switched == (NAMES[timed.group(1)] == "aten"), second.stdout[-3000:]
    assert "only to rounding" not in second.stdout
    assert recorded(ckpt, 6) == "onednn"

    records = losses(jsonl)
    assert [s for s, _ in records] == [1, 2, 3, 3, 4, 5, 6]
    # Every step, before the kill and after the resume, equals the uninterrupted run bit for bit.
    assert records == [(s, reference[s]) for s, _ in records]
    # Losses of the two libraries can agree by rounding luck over a few steps; gradient norms
    # (float64 in the log) and the final weights cannot: on torch.mm from step 3 on, both differ
    # (grad norm at step 4 on the Xeon this was written on).
    assert grad_norms(jsonl)[-4:] == grad_norms(ref_dir / "steps.jsonl")[-4:]
    ours, theirs = final_weights(ckpt / "step_6"), final_weights(ref_dir / "ckpt" / "step_6")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
