"""Worker for tests/test_parallel_layouts.py: a few AdamW steps of a tiny Llama on fixed
synthetic data in one parallel layout (started by torchrun, or alone for the reference).

Usage: python _layout_worker.py '<json spec>' <result.json>
Spec keys: arch ("tiny" or a dict of Architecture fields), parallelism (ParallelismSpec fields,
snake_case), torch_compile, compile_cache_dir, precision, steps, micro_batch_size,
global_batch_size, seq_length, lr, clip.
Rank 0 writes {"losses": [...], "grad_norms": [...], "layout": {...}, "logits_width": N,
"eval_loss_sum": x, "eval_tokens": n} to the result file: after the steps, `evaluate` runs on one
more global batch (forward only) and returns its summed loss and token count; logits_width is
the vocabulary width of the logits one rank holds (the widest over ranks with the output
layer), which loss parallel keeps at vocab / tensor.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.parallel import init_distributed, parallelize, shutdown_distributed
from llamajob_trainer.presets import PRESETS, Architecture
from torch.distributed.tensor import DTensor


def synthetic_batch(step: int, gbs: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic progressions over the first 32 token ids: learnable, so the loss falls."""
    g = torch.Generator().manual_seed(1000 + step)
    span = min(32, vocab)
    start = torch.randint(0, span, (gbs, 1), generator=g)
    stride = torch.randint(1, 4, (gbs, 1), generator=g)
    tokens = (start + stride * torch.arange(seq + 1)) % span
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def main() -> None:
    spec = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    arch_spec = spec.get("arch", "tiny")
    arch = PRESETS[arch_spec] if isinstance(arch_spec, str) else Architecture(**arch_spec)
    mbs, gbs, seq = spec["micro_batch_size"], spec["global_batch_size"], spec["seq_length"]
    cfg = TrainerConfig.model_validate(
        {
            "parallelism": spec.get("parallelism", {}),
            "batch": {"micro_batch_size": mbs, "global_batch_size": gbs},
            "data": {"seq_length": seq},
            "precision": spec.get("precision", "fp32"),
            "compile": {
                "torch_compile": spec.get("torch_compile", False),
                "cache_dir": spec.get("compile_cache_dir", "compile-cache"),
            },
            "seed": 7,
            "max_steps": spec["steps"],
        }
    )
    env = init_distributed()
    torch.manual_seed(0)
    pm = parallelize(cfg, arch, env)
    # The backend's optimizer (fused AdamW), so each layout runs it over its own DTensor shards.
    opt = pm.make_optimizer(
        torch.optim.AdamW, pm.parameters(), lr=spec.get("lr", 3e-3), weight_decay=0.1
    )
    widths: list[int] = [0]

    def record_width(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        local = out.to_local() if isinstance(out, DTensor) else out
        widths.append(local.shape[-1])

    for part in pm.model_parts:
        if part.output is not None:
            part.output.register_forward_hook(record_width)
    per_rank = gbs // pm.dp_size
    losses, norms = [], []
    for step in range(spec["steps"]):
        inputs, labels = synthetic_batch(step, gbs, seq, arch.vocab_size)
        lo = pm.dp_rank * per_rank
        mine_x, mine_y = inputs[lo : lo + per_rank], labels[lo : lo + per_rank]
        micro = [(mine_x[i : i + mbs], mine_y[i : i + mbs]) for i in range(0, per_rank, mbs)]
        losses.append(pm.forward_backward(micro))
        norms.append(pm.clip_grad_norm(spec.get("clip", 0.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    # Validation pass over one global batch the steps did not train on.
    inputs, labels = synthetic_batch(spec["steps"], gbs, seq, arch.vocab_size)
    lo = pm.dp_rank * per_rank
    mine_x, mine_y = inputs[lo : lo + per_rank], labels[lo : lo + per_rank]
    loss_sum, tokens = pm.evaluate(
        [(mine_x[i : i + mbs], mine_y[i : i + mbs]) for i in range(0, per_rank, mbs)]
    )
    width = torch.tensor(max(widths))
    if env.world_size > 1:
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
    if env.rank == 0:
        result = {"losses": losses, "grad_norms": norms, "layout": asdict(pm.layout),
                  "logits_width": int(width), "eval_loss_sum": loss_sum, "eval_tokens": tokens}
        with open(out_path, "w") as f:
            json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
