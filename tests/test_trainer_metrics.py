"""Trainer metrics: catalogue names, the HTTP endpoint, per-step records and the MFU formula."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from llamajob_trainer import protocol
from llamajob_trainer.config import ModelSpec
from llamajob_trainer.metrics import (
    JsonlLog,
    StepRecord,
    build_registry,
    cpu_matmul_peaks,
    flops_per_token,
    measure_cpu_peak_flops,
    metric_names,
    mfu,
    peak_flops_total,
    read_jsonl,
    scrape_values,
    serve,
)
from prometheus_client import generate_latest
from trainer_helpers import MODEL, free_port

CATALOGUE = sorted(
    value for name, value in vars(protocol).items()
    if name.isupper() and isinstance(value, str) and value.startswith("llamajob_")
)

RECORD = StepRecord(
    step=7, max_steps=100, loss=3.141592653589793, lr=2.5e-4, grad_norm=0.75,
    tokens_per_second=12345.6, samples_per_second=96.4, mfu=0.123, step_seconds=0.33,
    consumed_samples=56,
)


def test_registry_holds_exactly_the_protocol_catalogue() -> None:
    assert len(CATALOGUE) == 15
    assert metric_names() == CATALOGUE


def test_import_does_not_pull_torch() -> None:
    code = "import sys, llamajob_trainer.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_endpoint_serves_labelled_values_over_http() -> None:
    registry, metrics = build_registry("job-a", "ns-b")
    metrics.max_steps.set(100)
    metrics.record_step(RECORD)
    metrics.last_checkpoint_step.set(5)
    metrics.checkpoint_save_seconds.observe(1.5)
    port = free_port()
    server = serve(registry, port, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
    values = scrape_values(text)
    assert f'{protocol.TRAIN_LOSS}{{job="job-a",namespace="ns-b"}} 3.141592653589793' in text
    assert values[protocol.TRAIN_STEP] == 7
    assert values[protocol.TRAIN_MAX_STEPS] == 100
    assert values[protocol.LAST_CHECKPOINT_STEP] == 5
    assert values[protocol.TRAIN_TOKENS_PER_SECOND] == pytest.approx(12345.6)
    assert values[protocol.TRAIN_MFU] == pytest.approx(0.123)
    assert values[f"{protocol.TRAIN_STEP_SECONDS}_count"] == 1
    assert values[f"{protocol.CHECKPOINT_SAVE_SECONDS}_sum"] == 1.5
    assert "process_cpu_seconds_total" not in text  # dedicated registry, nothing else


def test_log_line_and_jsonl(tmp_path: Path) -> None:
    line = RECORD.log_line()
    for part in ("step 7/100", "loss 3.1416", "lr 2.500e-04", "grad norm 0.750", "12,346 tok/s",
                 "MFU 12.30%", "0.330 s/step"):
        assert part in line, part
    log = JsonlLog(tmp_path / "sub" / "steps.jsonl")
    log.write(RECORD)
    log.write(RECORD)
    log.close()
    records = read_jsonl(tmp_path / "sub" / "steps.jsonl")
    assert len(records) == 2
    assert records[0]["loss"] == RECORD.loss  # exact float round trip
    assert set(records[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_second", "mfu"}
    assert "validation_loss" not in records[0] and "validation" not in line
    json.dumps(records)


def test_validation_loss_in_line_record_and_gauge(tmp_path: Path) -> None:
    registry, metrics = build_registry("job-a", "ns-b")
    metrics.record_step(RECORD)
    assert str(scrape_values(generate_latest(registry).decode())[protocol.VALIDATION_LOSS]) == "nan"
    evaluated = replace(RECORD, validation_loss=2.5)
    metrics.record_step(evaluated)
    metrics.record_step(RECORD)  # a step without evaluation keeps the last figure
    assert scrape_values(generate_latest(registry).decode())[protocol.VALIDATION_LOSS] == 2.5
    assert evaluated.log_line().endswith(" | validation loss 2.5000")
    log = JsonlLog(tmp_path / "steps.jsonl")
    log.write(evaluated)
    log.close()
    assert read_jsonl(tmp_path / "steps.jsonl")[0]["validation_loss"] == 2.5


def test_flops_per_token_counts_matmul_parameters() -> None:
    import torch
    from llamajob_trainer.model import Llama

    arch = ModelSpec.model_validate(MODEL).architecture()
    with torch.device("meta"):
        model = Llama(arch)
    # Everything but the embedding lookup table takes part in a matmul (or a norm).
    counted = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tok_emb"))
    seq = 64
    expected = 6 * counted + 12 * arch.num_layers * arch.hidden_size * seq
    assert flops_per_token(arch, seq) == expected
    assert mfu(1000.0, expected, 1000.0 * expected * 4) == pytest.approx(0.25)
    assert mfu(1000.0, expected, 0.0) == 0.0


def test_peak_from_catalogue_or_measurement() -> None:
    assert peak_flops_total(95.0, 32, None) == 95e12 * 32
    measured = measure_cpu_peak_flops()
    assert measured > 1e8  # any CPU of this decade does 0.1 GFLOP/s in fp32
    assert measure_cpu_peak_flops() == measured  # measured once per process
    assert peak_flops_total(None, 2, measured) == 2 * measured


def test_cpu_peak_times_each_matmul_library() -> None:
    import torch
    from llamajob_trainer import cpu_linear

    fp32 = cpu_matmul_peaks(128, 2)
    expected = {"torch.mm", "oneDNN"} if cpu_linear.available() else {"torch.mm"}
    assert set(fp32) == expected and min(fp32.values()) > 1e8
    # bf16 matmuls already run on oneDNN through torch.mm: one figure only.
    assert set(cpu_matmul_peaks(128, 2, torch.bfloat16)) == {"torch.mm"}
