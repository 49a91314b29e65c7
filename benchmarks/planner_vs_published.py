"""The planner's predictions beside published figures: trn1 (NxD), trn2 and p5.

For the trn1 examples (examples/llama3-8b.yaml, examples/llama3-70b.yaml) and the trn2 and p5
ones (examples/llama3-8b-trn2.yaml, examples/llama3-70b-trn2.yaml, examples/llama3-8b-p5.yaml)
it prints what `make_plan` says: memory per device and whether it fits, step time, tokens/s and
cost at the default MFU. Then,
for every published trn1 Llama run whose layout our spec can express, the planner's step time at
that run's settings beside the published one, with the difference and the MFU the publication
implies; for trn2 and p5 the published throughput figures, and plainly where none was found. A
benchmark: it prints and asserts nothing (tests/test_plan_trn1.py holds the 70B runs to 10%).

Published figures looked for, and where:
- trn1, NeuronX Distributed on torch-xla (the nxd backend's stack): AWS's trn1 training table,
  about-neuron/benchmarks/trn1/training_data_decoder.csv in github.com/aws-neuron/aws-neuron-sdk
  (Neuron 2.24 for the Llama 3.1 rows; the Llama 2 rows were last listed for Neuron 2.21, commit
  752349fd of that file), and the SageMaker HyperPod Llama 3 70B trn1 guide's training log
  (github.com/awslabs/ai-on-sagemaker-hyperpod, website/docs/02-slurm-blueprints/training/
  trainium/Llama3-70B/04-training.md L165-169: NxD's run_llama3_70B_tp_pp.sh on 16 nodes). The
  two Llama 3 70B runs calibrate the trn1+pp MFU and the Llama 3.1 8B run the trn1 one
  (DEFAULT_MFU_BY_FAMILY in operator/llamajob/plan.py); the Llama 2 rows (sequence 4096, an
  older release) are printed beside them, uncalibrated.
- TorchNeuron / TorchTitan-Neuron on trn2 (the torch backend's stack there): the AWS Neuron
  documentation's TorchTitan Neuron pages (https://awsdocs-neuron.readthedocs-hosted.com/en/
  latest/training/torchtitan/index.html: overview, quickstart, the basic-training and SimpleFSDP
  tutorials, best practices; release notes for Neuron 2.33) give configurations but no
  throughput, and the Neuron performance pages (about-neuron/benchmarks in
  github.com/aws-neuron/aws-neuron-sdk) have training tables for trn1 only. None found.
- H100 (p5): torchtitan's own benchmark, benchmarks/llama3_h100_202412_torchtitan.md in
  github.com/pytorch/torchtitan (FSDP2 as here), and the training log in the FSDP sample's
  README (aws-samples/awsome-distributed-training, 3.test_cases/pytorch/FSDP/slurm/README.md).

Run: .venv/bin/python benchmarks/planner_vs_published.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajob.api import LlamaTrainingJobSpec
from llamajob.catalogue import INSTANCE_TYPES
from llamajob.jobfile import load_job
from llamajob.plan import Plan, flops_per_token, make_plan, mfu_family
from llamajob_trainer.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent

@dataclass(frozen=True)
class Published:
    source: str
    what: str  # model, instance, stack and settings, as published
    tokens_per_s_per_device: float
    model: str  # our preset, for the FLOPs per token behind the implied MFU
    seq: int
    peak_tflops_per_device: float  # the denominator the source's own MFU would use
    note: str = ""


H100 = INSTANCE_TYPES["ml.p5.48xlarge"]
NEURON_CSV = "aws-neuron/aws-neuron-sdk about-neuron/benchmarks/trn1/training_data_decoder.csv"
HYPERPOD_70B = (
    "awslabs/ai-on-sagemaker-hyperpod website/docs/02-slurm-blueprints/training/trainium/"
    "Llama3-70B/04-training.md L165-169 (training log, steps 2-5)"
)
TORCHTITAN = "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 1"
FSDP_SAMPLE = (
    "aws-samples/awsome-distributed-training 3.test_cases/pytorch/FSDP/slurm/README.md "
    "(training log excerpt)"
)

# Figures per device (an H100).
PUBLISHED: dict[str, list[Published]] = {
    "trn2": [],  # none found: see the module docstring
    "p5": [
        Published(TORCHTITAN, "Llama 3.1 8B, 8 H100 (96 GB HBM2e, 500 W), FSDP2, local batch 2, "
                  "seq 8192, selective (per-op) recompute, eager; peak memory 82.4 GiB",
                  5762, "llama3.1-8b", 8192, H100.peak_tflops_per_core,
                  "torchtitan notes its H100s run below the SXM peak used here"),
        Published(TORCHTITAN.replace("Table 1", "Table 3"), "Llama 3.1 8B, 128 H100, FSDP2, "
                  "local batch 2, seq 8192, selective recompute, eager; peak memory 67.0 GiB",
                  5605, "llama3.1-8b", 8192, H100.peak_tflops_per_core),
        Published(FSDP_SAMPLE, "Llama 3.1 8B (vocab 50432), 4 x p5.48xlarge, FSDP1 full shard, "
                  "batch 1 per GPU, 4096-token sequences, activation checkpointing and "
                  "offloading: 10.90 and 11.09 samples/s at steps 1-2",
                  11.0 * 4096 / 32, "llama3.1-8b", 4096, H100.peak_tflops_per_core,
                  "first steps of a run, not a steady state; vocabulary 50432, not 128256"),
    ],
}


@dataclass(frozen=True)
class PublishedRun:
    """A published trn1 run whose layout a spec can express: the planner's step time at its
    settings is printed beside the published one."""

    what: str  # model, nodes, layout and settings, as published
    source: str
    published: str  # the figure as the source gives it
    seconds_per_step: float
    spec: dict[str, Any]
    calibrates: bool  # one of the runs DEFAULT_MFU_BY_FAMILY was fitted to


def trn1_run(preset: str, nodes: int, tensor: int, pipeline: int, seq: int,
             kv_replicator: int = 1) -> dict[str, Any]:
    """NxD on trn1.32xlarge at a published run's settings: micro-batch 1, global batch 1024,
    ZeRO-1 and sequence parallel, as AWS's recipes run them. Recompute is full with a pipeline
    (what examples/llama3-70b.yaml does) and selective without; the step time does not depend
    on it."""
    return {
        "model": {"preset": preset},
        "data": {"seq_length": seq},
        "parallelism": {"tensor": tensor, "pipeline": pipeline, "kv_replicator": kv_replicator,
                        "zero1": True, "sequence_parallel": True,
                        "activation_checkpointing": "full" if pipeline > 1 else "selective"},
        "batch": {"micro_batch_size": 1, "global_batch_size": 1024},
        "cluster": {"nodes": nodes, "instance_type": "ml.trn1.32xlarge"},
    }


TRN1_RUNS: list[PublishedRun] = [
    PublishedRun("Llama-3.1-70B, 32 x trn1.32xlarge, TP=32 PP=8 DP=4, gbs 1024, seq 8192",
                 f"{NEURON_CSV} (Neuron 2.24)", "7.94 seq/s", 1024 / 7.94,
                 trn1_run("llama3.1-70b", 32, 32, 8, 8192, 4), True),
    PublishedRun("Llama-3-70B, 16 x trn1.32xlarge, TP=32 PP=8 DP=2, gbs 1024, seq 8192 "
                 "(NxD's run_llama3_70B_tp_pp.sh)", HYPERPOD_70B,
                 "steps 2-5 at 243.86, 243.81, 243.82, 243.87 s", 243.84,
                 trn1_run("llama3-70b", 16, 32, 8, 8192, 4), True),
    PublishedRun("Llama-3.1-8B, 32 x trn1.32xlarge, TP=32 DP=32 ZeRO-1, gbs 1024, seq 8192",
                 f"{NEURON_CSV} (Neuron 2.24)", "47.95 seq/s", 1024 / 47.95,
                 trn1_run("llama3.1-8b", 32, 32, 1, 8192, 4), True),
    PublishedRun("Llama2-70B, 32 x trn1.32xlarge, TP=32 PP=8 DP=4, gbs 1024, seq 4096",
                 f"{NEURON_CSV} (Neuron 2.21)", "14.44 seq/s", 1024 / 14.44,
                 trn1_run("llama2-70b", 32, 32, 8, 4096, 4), False),
    PublishedRun("Llama2-13B, 32 x trn1.32xlarge, TP=8 PP=8 DP=16, gbs 1024, seq 4096",
                 f"{NEURON_CSV} (Neuron 2.21)", "80.33 seq/s", 1024 / 80.33,
                 trn1_run("llama2-13b", 32, 8, 8, 4096), False),
    PublishedRun("Llama2-7B, 16 x trn1.32xlarge, TP=8 DP=64, gbs 1024, seq 4096",
                 f"{NEURON_CSV} (Neuron 2.21)", "95.14 seq/s", 1024 / 95.14,
                 trn1_run("llama2-7b", 16, 8, 1, 4096), False),
]


def trn1_lines() -> list[str]:
    lines = ["planner beside publication, trn1 (NeuronX Distributed on torch-xla):"]
    for run in TRN1_RUNS:
        spec = LlamaTrainingJobSpec.model_validate(run.spec)
        plan = make_plan(spec)
        lines.append(f"  {run.what}" + ("  [calibration run]" if run.calibrates else ""))
        if plan.errors:
            lines.append(f"    INVALID here: {'; '.join(str(e) for e in plan.errors)}")
            continue
        assert plan.assumed_mfu is not None
        ratio = plan.step_seconds / run.seconds_per_step
        implied = plan.assumed_mfu * ratio
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines += [
            f"    published  {run.published} = {run.seconds_per_step:.1f} s/step "
            f"(implied MFU {implied:.1%})",
            f"    planner    {plan.step_seconds:.1f} s/step at MFU {plan.assumed_mfu:.0%} "
            f"({mfu_family(spec)}): {ratio - 1:+.1%}",
            f"    memory     our trainer at these settings: {plan.memory_per_core_gib:.2f} of "
            f"{plan.core_memory_gib:.0f} GiB per NeuronCore, {verdict}",
            f"    source: {run.source}",
        ]
    return lines


def load_spec(name: str) -> tuple[LlamaTrainingJobSpec, str]:
    """The example's spec, from its file: the examples are the layouts this prints."""
    return load_job(ROOT / "examples" / f"{name}.yaml").spec, f"examples/{name}.yaml"


def describe(name: str, origin: str, plan: Plan) -> list[str]:
    spec = plan.spec
    devices = plan.world_size
    lines = [
        f"{name}  [{origin}]",
        f"  {spec.model.preset} on {plan.nodes} x {plan.instance.name} ({devices} ranks), "
        f"backend {plan.backend} on {plan.device}; tensor {plan.tensor} x pipeline "
        f"{plan.pipeline} x data {plan.data_parallel}, fsdp {spec.parallelism.fsdp}, "
        f"recompute {spec.parallelism.activation_checkpointing}, seq {spec.data.seq_length}, "
        f"global batch {spec.batch.global_batch_size}",
    ]
    if plan.errors:
        lines.append(f"  INVALID: {'; '.join(str(e) for e in plan.errors)}")
        return lines
    assert plan.memory is not None
    m = plan.memory.gib()
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"  memory     {m['total']:.2f} of {plan.core_memory_gib:.2f} GiB per device: {verdict}"
        + (f" (fix: {plan.suggestion})" if not plan.fits and plan.suggestion else ""),
        "             " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "total"),
    ]
    tokens_per_s = plan.tokens_per_step / plan.step_seconds
    cost_per_step = plan.step_seconds / 3600 * plan.price_per_hour * plan.nodes
    price = (
        f"${plan.price_per_hour:.2f}/node-hour" if plan.price_per_hour
        else "no published on-demand price"
    )
    lines += [
        f"  speed      assumed MFU {plan.assumed_mfu:.0%}: {plan.step_seconds:.2f} s/step, "
        f"{tokens_per_s:,.0f} tokens/s, {tokens_per_s / devices:,.0f} tokens/s per device",
        f"  cost       {price}: ${cost_per_step:.2f}/step, "
        f"${cost_per_step / plan.tokens_per_step * 1e9:,.0f} per billion tokens, "
        f"${plan.total_cost_usd:,.0f} for {plan.total_steps:,} steps",
    ]
    return lines


def published_lines(family: str) -> list[str]:
    figures = PUBLISHED[family]
    if not figures:
        return [f"published, {family}: NONE FOUND - no TorchNeuron or TorchTitan-Neuron "
                "training throughput is published for trn2 (see this script's docstring for "
                "where we looked); the planner's trn2 speed rests on the 25% that was its "
                "single trn1 figure."]
    lines = [f"published, {family}:"]
    for f in figures:
        flops = flops_per_token(PRESETS[f.model], f.seq)
        mfu = f.tokens_per_s_per_device * flops / (f.peak_tflops_per_device * 1e12)
        lines += [
            f"  {f.what}",
            f"    {f.tokens_per_s_per_device:,.0f} tokens/s per device "
            f"(implied MFU {mfu:.1%} of {f.peak_tflops_per_device:,.1f} TFLOPS)"
            + (f"; {f.note}" if f.note else ""),
            f"    source: {f.source}",
        ]
    return lines


def main() -> int:
    for name in ("llama3-8b", "llama3-70b", "llama3-8b-trn2", "llama3-70b-trn2", "llama3-8b-p5"):
        spec, origin = load_spec(name)
        print("\n".join(describe(name, origin, make_plan(spec))))
        print()
    print("\n".join(trn1_lines()))
    print()
    for family in ("trn2", "p5"):
        print("\n".join(published_lines(family)))
        print()
    # The planner at the published runs' own settings where they are ours to express: the FSDP
    # sample's 8B on 4 x p5 (FSDP, batch 1, seq 4096, vocabulary 50432, full recompute), and
    # torchtitan's 8 H100 run (local batch 2, seq 8192; its per-op selective recompute is not
    # ours, which recomputes only the attention core, so the memory is not comparable).
    at_their_settings = {
        "FSDP sample, 8B on 4 x p5": {
            "backend": "torch", "model": {"preset": "llama3.1-8b", "vocab_size": 50432},
            "data": {"seq_length": 4096},
            "parallelism": {"fsdp": True, "zero1": False, "activation_checkpointing": "full"},
            "batch": {"micro_batch_size": 1, "global_batch_size": 32},
            "cluster": {"nodes": 4, "instance_type": "ml.p5.48xlarge"},
        },
        "torchtitan, 8B on 8 H100 (1 x p5)": {
            "backend": "torch", "model": {"preset": "llama3.1-8b"},
            "data": {"seq_length": 8192},
            "parallelism": {"fsdp": True, "zero1": False,
                            "activation_checkpointing": "selective"},
            "batch": {"micro_batch_size": 2, "global_batch_size": 16},
            "cluster": {"nodes": 1, "instance_type": "ml.p5.48xlarge"},
        },
    }
    print("planner at the published runs' settings (our trainer, not theirs):")
    for label, data in at_their_settings.items():
        plan = make_plan(LlamaTrainingJobSpec.model_validate(data))
        print("\n".join("  " + line for line in describe(label, "built here", plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
