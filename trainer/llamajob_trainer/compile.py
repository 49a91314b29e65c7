"""The compile step (`llamajob compile --config FILE`), run once per compile key before training.

- nxd backend: `compile.steps` full training steps (forward, backward, clip, optimizer) on
  random tokens of the job's shapes. It is meant to run under `neuron_parallel_compile`, which
  extracts the XLA graphs of those steps and compiles them in parallel into the cache on the
  shared file system. Needs Trainium and the Neuron SDK; it cannot run on CPU.

  The extraction run compiles nothing: `neuron_parallel_compile` starts the command with
  NEURON_EXTRACT_GRAPHS_ONLY set, the steps only record their graphs (with invalid outputs),
  and the compiler runs after the command has ended ("PyTorch NeuronX neuron_parallel_compile
  CLI"; "PyTorch NeuronX Environment Variables", NEURON_EXTRACT_GRAPHS_ONLY). So the marker is
  not written by that run. The operator's compile pods wrap `neuron_parallel_compile` in this
  module (`python -m llamajob_trainer.compile --node R --nodes N --config FILE --
  neuron_parallel_compile torchrun ...`, see ``main``): when it exits 0 the pod records its
  node as compiled, and the pod that completes the set of nodes writes the marker. Each node
  compiles the graphs its own ranks extracted (pipeline stages differ), so one node's success
  does not vouch for the others'.
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

Either way (outside graph extraction) rank 0 then writes the compile marker at
`protocol.compile_marker_path(compile.cacheDir, key)`, only after every step succeeded: a
failed compile leaves none. When the marker already exists the work is skipped. The
termination message says which happened: {"compileCached": true|false, "compileKey": key}.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from . import protocol
from .config import TrainerConfig

# Set by neuron_parallel_compile for the run it extracts graphs from (torch-neuronx).
EXTRACT_GRAPHS_ENV = "NEURON_EXTRACT_GRAPHS_ONLY"
# Beside the marker: one file per node whose neuron_parallel_compile succeeded.
NODES_SUFFIX = ".nodes"


def extracting_graphs(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside neuron_parallel_compile's extraction run, where nothing is compiled or
    executed. NxD's Llama scripts test the variable the same way (neuronx-distributed v2.28.0,
    examples/training/llama/: tp_pp_llama_hf_pretrain/run_llama3_70B_tp_pp.sh, line 109, for
    "1"; tp_zero1_llama_hf_pretrain/tp_zero1_llama_hf_pretrain.py, line 203, for any value)."""
    return environ.get(EXTRACT_GRAPHS_ENV, "") not in ("", "0")


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
        step_loss = pm.forward_backward(random_batch())
        if nxd:
            optimizer_step(pm, optimizers, cfg.optimizer.grad_clip)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
        loss = float(step_loss)  # nxd: read with the optimizer step's graph, as in training
        if env.rank == 0:
            log(f"compile step {i + 1}/{steps}: loss {loss:.4f}")
    if cfg.validation.sequences:
        # Validation runs forward-only graphs, which the training steps above do not contain.
        loss_sum, tokens = pm.evaluate(random_batch())
        if env.rank == 0:
            log(f"compile validation pass: loss {loss_sum / max(tokens, 1):.4f}")
    if env.rank == 0 and (report := pm.compile_report()):
        log(report)
    extracting = extracting_graphs()
    # Graph extraction executes nothing and its outputs are invalid (see the module docstring).
    if not extracting and not math.isfinite(loss):
        raise RuntimeError(f"compile validation step produced a non-finite loss ({loss})")
    seconds = time.perf_counter() - started
    if extracting:
        message = (f"extracted the graphs of key {key} in {seconds:.1f} s; "
                   "neuron_parallel_compile compiles them next, the marker follows its success")
        if env.rank == 0:
            log(message)
        shutdown_distributed()
        return {"compileCached": False, "compileKey": key, "reason": "GraphsExtracted",
                "permanent": False, "message": message}
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


def nodes_dir(marker: Path) -> Path:
    return marker.with_name(marker.name + NODES_SUFFIX)


def record_compiled(
    cfg: TrainerConfig,
    node: int,
    nodes: int,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, Any]:
    """After this node's neuron_parallel_compile exited 0: record the node, and write the
    marker once every node of the gang is recorded. Returns the termination-message fields.

    The node files are written before the check, so of the nodes finishing together at least
    the last one sees the whole set. Files left by an earlier attempt of the same key count:
    the key fixes the graphs, and that node compiled them then.
    """
    if not 0 <= node < nodes:
        raise ValueError(f"node {node} is not one of {nodes} nodes")
    key, marker = compile_key_and_marker(cfg)
    if marker.is_file():
        # The extraction run found it (nothing was extracted), or the set completed earlier.
        message = f"compile cache hit for key {key} ({marker}); nothing compiled"
        log(message)
        return {"compileCached": True, "compileKey": key, "reason": "CompileCached",
                "permanent": False, "message": message}
    done = nodes_dir(marker)
    write_marker(done / str(node), {"compileKey": key, "node": node, "nodes": nodes,
                                    "createdAt": time.time()})
    missing = [n for n in range(nodes) if not (done / str(n)).is_file()]
    if missing:
        message = (f"node {node}: neuron_parallel_compile compiled its graphs of key {key}; "
                   f"waiting on {len(missing)} of {nodes} node(s) for the marker")
    else:
        write_marker(marker, {
            "compileKey": key,
            "backend": cfg.resolved_backend,
            "image": cfg.image,
            "nodes": nodes,
            "compiledBy": "neuron_parallel_compile",
            "createdAt": time.time(),
        })
        message = f"all {nodes} node(s) compiled the graphs of key {key}; marker {marker}"
    log(message)
    return {"compileCached": False, "compileKey": key, "reason": "Compiled",
            "permanent": False, "message": message}


def run_wrapped(argv: Sequence[str]) -> int:
    """Run ``argv`` to its end and return its exit status (128 + signal if one killed it),
    passing on SIGTERM and SIGINT: in a pod this process is PID 1, the one the kubelet
    signals."""
    child = subprocess.Popen(list(argv))

    def forward(signum: int, _frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


USAGE = ("usage: python -m llamajob_trainer.compile --node R --nodes N [--config FILE] -- "
         "neuron_parallel_compile torchrun ...")


# What the compile step reports when its run on this node ended well (``run_compile``).
STEP_DONE = ("GraphsExtracted", "CompileCached", "Compiled")


def _parse_main(argv: Sequence[str]) -> tuple[int, int, str | None, list[str]] | None:
    args = list(argv)
    if "--" not in args:
        return None
    split = args.index("--")
    options, wrapped = args[:split], args[split + 1 :]
    values: dict[str, str] = {}
    while options:
        name = options.pop(0)
        if name not in ("--node", "--nodes", "--config") or not options:
            return None
        values[name] = options.pop(0)
    try:
        node, nodes = int(values["--node"]), int(values["--nodes"])
    except (KeyError, ValueError):
        return None
    if not wrapped or not 0 <= node < nodes:
        return None
    return node, nodes, values.get("--config"), wrapped


def main(argv: Sequence[str]) -> int:
    """The nxd compile pod's command: run the wrapped ``neuron_parallel_compile`` and, when it
    exits 0 after the compile step on this node reported success, record this node
    (``record_compiled``). Otherwise its status is returned with no record: the marker stays
    absent and the next compile of the key does the work again.

    The step's own report (its termination message, written by local rank 0) is checked too,
    in case the wrapper exits 0 after the script failed. A graph the compiler fails while
    neuron_parallel_compile still exits 0 is not caught here: the training run compiles it
    again (NEURON_CC_FLAGS has --retry_failed_compilation).
    """
    parsed = _parse_main(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    node, nodes, config, wrapped = parsed
    code = run_wrapped(wrapped)
    if code != 0:
        print(f"llamajob compile: {wrapped[0]} exited with status {code}; no compile marker",
              file=sys.stderr, flush=True)
        return code
    from .cli import load_config

    cfg = load_config(config)
    key, _ = compile_key_and_marker(cfg)
    try:
        text: str | None = protocol.termination_log_path().read_text()
    except OSError:
        text = None
    step = protocol.parse_termination_message(text)
    if step.get("compileKey") != key or step.get("reason") not in STEP_DONE:
        print(f"llamajob compile: {wrapped[0]} exited with status 0 but the compile step on "
              f"this node reported no success for key {key} ({step or 'no report'}); "
              "no compile marker", file=sys.stderr, flush=True)
        return 1
    fields = record_compiled(cfg, node, nodes)
    protocol.write_termination_message(**fields)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
