"""The planner's predictions for the trn2 and p5 examples, beside the published figures.

For examples/llama3-8b-trn2.yaml, examples/llama3-70b-trn2.yaml and examples/llama3-8b-p5.yaml
(built here from the same description when a file is missing) it prints what `make_plan` says:
memory per device and whether it fits, step time, tokens/s and cost at the family's default
MFU. Then every published throughput figure found for the same stack, and plainly where none
was found. A benchmark: it prints and asserts nothing.

Published figures looked for, and where:
- TorchNeuron / TorchTitan-Neuron on trn2 (the torch backend's stack there): the AWS Neuron
  documentation's TorchTitan Neuron pages (https://awsdocs-neuron.readthedocs-hosted.com/en/
  latest/training/torchtitan/index.html: overview, quickstart, the basic-training and SimpleFSDP
  tutorials, best practices; release notes for Neuron 2.33) give configurations but no
  throughput, and the Neuron performance pages (about-neuron/benchmarks in
  github.com/aws-neuron/aws-neuron-sdk) have training tables for trn1 only
  (benchmarks/trn1/training_data_decoder.csv). None found.
- For context, the nearest published Neuron training figures: that trn1 table (NeuronX
  Distributed on torch-xla, Neuron 2.24): another instance and another stack, printed as such.
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
from llamajob.plan import Plan, flops_per_token, make_plan
from llamajob_trainer.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent

# The examples as described, for when their files are not there: the torch backend on trn2
# (TP + SP inside a node, FSDP2 over the rest) and FSDP2 on four p5 nodes.
FALLBACK_SPECS: dict[str, dict[str, Any]] = {
    "llama3-8b-trn2": {
        "backend": "torch",
        "model": {"preset": "llama3-8b"},
        "data": {"seq_length": 8192},
        "parallelism": {"tensor": 4, "fsdp": True, "zero1": False, "sequence_parallel": True,
                        "activation_checkpointing": "full"},
        "batch": {"micro_batch_size": 1, "global_batch_size": 16},
        "precision": "bf16-mixed",
        "cluster": {"nodes": 1, "instance_type": "ml.trn2.48xlarge"},
    },
    "llama3-70b-trn2": {
        "backend": "torch",
        "model": {"preset": "llama3-70b"},
        "data": {"seq_length": 8192},
        "parallelism": {"tensor": 8, "fsdp": True, "zero1": False, "sequence_parallel": True,
                        "activation_checkpointing": "full"},
        "batch": {"micro_batch_size": 1, "global_batch_size": 64},
        "precision": "bf16-mixed",
        "cluster": {"nodes": 8, "instance_type": "ml.trn2.48xlarge"},
    },
    "llama3-8b-p5": {
        "backend": "torch",
        "model": {"preset": "llama3-8b"},
        "data": {"seq_length": 8192},
        "parallelism": {"fsdp": True, "zero1": False, "activation_checkpointing": "full"},
        "batch": {"micro_batch_size": 1, "global_batch_size": 32},
        "precision": "bf16-mixed",
        "cluster": {"nodes": 4, "instance_type": "ml.p5.48xlarge"},
    },
}


@dataclass(frozen=True)
class Published:
    source: str
    what: str  # model, instance, stack and settings, as published
    tokens_per_s_per_device: float
    model: str  # our preset, for the FLOPs per token behind the implied MFU
    seq: int
    peak_tflops_per_device: float  # the denominator the source's own MFU would use
    note: str = ""


TRN1 = INSTANCE_TYPES["ml.trn1.32xlarge"]
H100 = INSTANCE_TYPES["ml.p5.48xlarge"]
NEURON_CSV = (
    "aws-neuron/aws-neuron-sdk about-neuron/benchmarks/trn1/training_data_decoder.csv "
    "(Neuron 2.24)"
)
TORCHTITAN = "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 1"
FSDP_SAMPLE = (
    "aws-samples/awsome-distributed-training 3.test_cases/pytorch/FSDP/slurm/README.md "
    "(training log excerpt)"
)

# Figures per device (a trn1 NeuronCore, an H100). The trn1 rows: 47.95 and 7.94 sequences/s of
# 8192 tokens on 32 nodes of 32 NeuronCores.
PUBLISHED: dict[str, list[Published]] = {
    "trn2": [],  # none found: see the module docstring
    "trn1 (context only)": [
        Published(NEURON_CSV, "Llama-3.1-8B, 32 x trn1.32xlarge, NxD TP=32 DP=32 ZeRO-1, "
                  "gbs 1024, seq 8192", 47.95 * 8192 / (32 * 32), "llama3.1-8b", 8192,
                  TRN1.peak_tflops_per_core, "NeuronX Distributed on torch-xla, not TorchNeuron"),
        Published(NEURON_CSV, "Llama-3.1-70B, 32 x trn1.32xlarge, NxD TP=32 PP=8 DP=4, "
                  "gbs 1024, seq 8192", 7.94 * 8192 / (32 * 32), "llama3.1-70b", 8192,
                  TRN1.peak_tflops_per_core, "NeuronX Distributed on torch-xla, not TorchNeuron"),
    ],
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


def load_spec(name: str) -> tuple[LlamaTrainingJobSpec, str]:
    path = ROOT / "examples" / f"{name}.yaml"
    if path.exists():
        return load_job(path).spec, f"examples/{name}.yaml"
    return LlamaTrainingJobSpec.model_validate(FALLBACK_SPECS[name]), "built here (no file)"


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
                "where we looked); the planner's trn2 speed rests on the trn1 MFU."]
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
    for name in ("llama3-8b-trn2", "llama3-70b-trn2", "llama3-8b-p5"):
        spec, origin = load_spec(name)
        print("\n".join(describe(name, origin, make_plan(spec))))
        print()
    for family in ("trn2", "trn1 (context only)", "p5"):
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
