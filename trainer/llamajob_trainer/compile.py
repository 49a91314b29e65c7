"""The compile step (`llamajob compile --config FILE`), run once per compile key before training.

- nxd backend: `compile.steps` full training steps (forward, backward, clip, optimizer) on
  random tokens of the job's shapes. It is meant to run under `neuron_parallel_compile`, which
  extracts the XLA graphs of those steps and compiles them in parallel into the cache on the
  shared file system. Needs Trainium and the Neuron SDK; it cannot run on CPU.
- torch backend: one validation step (forward + backward of one optimizer step's
  micro-batches) on the job's device (``device``: auto, cpu, cuda, neuron), which fails fast on
  a layout or model that cannot run, or a device that is missing here (exit code 79). With
  ``compile.torchCompile`` that step also compiles the blocks with the device's compile
  backend; Inductor's (cpu, cuda) cache is under ``compile.cacheDir``, so the training pods
  load the kernels instead of compiling them. TorchNeuron (neuron) keeps its compiled graphs
  in its NEFF cache, which the operator's pods put under ``compile.cacheDir/neff`` on the shared
  volume (``TORCH_NEURONX_NEFF_CACHE_DIR``), so the step warms it for the training pods.
- either backend, with ``validation.sequences``: then one forward-only pass as validation runs
  it, so its graphs are in the cache too.

Either way rank 0 then writes the compile marker at
`protocol.compile_marker_path(compile.cacheDir, key)`. When the marker already exists the work
is skipped. The termination message says which happened: {"compileCached": true|false,
"compileKey": key}.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import protocol
from .config import TrainerConfig


def compile_key_and_marker(cfg: TrainerConfig) -> tuple[str, Path]:
    device = cfg.device
    if device == "auto":
        # Only a local run leaves it open (the operator writes the instance type's device);
        # the key names what this process would train on.
        from .parallel.device import requested_type

        device = requested_type(device)
    key = cfg.compile_key(cfg.resolved_backend, cfg.image, device)
    return key, protocol.compile_marker_path(cfg.compile.cache_dir, key)


def run_compile(
    cfg: TrainerConfig, log: Callable[[str], None] = lambda line: print(line, flush=True)
) -> dict[str, Any]:
    """Compile (or find cached) graphs; returns the termination-message fields."""
    key, marker = compile_key_and_marker(cfg)
    if marker.is_file():
        message = f"compile cache hit for key {key} ({marker}); nothing to compile"
        log(message)
        return {"compileCached": True, "compileKey": key, "reason": "CompileCached",
                "permanent": False, "message": message}

    import torch

    from .parallel import init_distributed, parallelize, shutdown_distributed
    from .train import build_optimizers, optimizer_step

    arch = cfg.model.architecture()
    env = init_distributed(cfg.resolved_backend, cfg.device)
    nxd = cfg.resolved_backend == "nxd"
    steps = cfg.compile.steps if nxd else 1
    started = time.perf_counter()
    pm = parallelize(cfg, arch, env)
    optimizers = build_optimizers(pm, cfg.optimizer) if nxd else []
    n_micro = cfg.batch.global_batch_size // (cfg.batch.micro_batch_size * pm.dp_size)
    # Tokens are drawn on the CPU and moved by the backend, so every device sees the same ones.
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch.micro_batch_size, cfg.data.seq_length + 1)

    def random_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One optimizer step's micro-batches of random tokens, as (inputs, labels)."""
        rows = [torch.randint(0, arch.vocab_size, shape, generator=gen) for _ in range(n_micro)]
        return [(r[:, :-1], r[:, 1:]) for r in rows]

    loss = float("nan")
    for i in range(steps):
        loss = pm.forward_backward(random_batch())
        if nxd:
            optimizer_step(pm, optimizers, cfg.optimizer.grad_clip)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
        if env.rank == 0:
            log(f"compile step {i + 1}/{steps}: loss {loss:.4f}")
    if cfg.validation.sequences:
        # Validation runs forward-only graphs, which the training steps above do not contain.
        loss_sum, tokens = pm.evaluate(random_batch())
        if env.rank == 0:
            log(f"compile validation pass: loss {loss_sum / max(tokens, 1):.4f}")
    if env.rank == 0 and (report := pm.compile_report()):
        log(report)
    if not math.isfinite(loss):
        raise RuntimeError(f"compile validation step produced a non-finite loss ({loss})")
    seconds = time.perf_counter() - started
    if env.rank == 0:
        write_marker(marker, {
            "compileKey": key,
            "backend": cfg.resolved_backend,
            "device": env.device.type,
            "image": cfg.image,
            "steps": steps,
            "seconds": round(seconds, 3),
            "worldSize": env.world_size,
            "createdAt": time.time(),
        })
        log(f"compiled key {key} in {seconds:.1f} s; marker {marker}")
    shutdown_distributed()
    return {"compileCached": False, "compileKey": key, "reason": "Compiled", "permanent": False,
            "message": f"compiled in {seconds:.1f} s"}


def write_marker(path: Path, content: dict[str, Any]) -> None:
    """Atomic: a reader sees no marker or a whole one, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
