"""What checkpoint integrity costs: SHA-256 digests on save, their check before a load.

Two ranks with FSDP2 (a torchrun subprocess), the same model and optimizer state as the save
figure of ``trainer_throughput.py`` (~45M parameters with ``--quick``, ~165M otherwise; Adam
moments included, so 0.5 GB / 2 GB on disk). Saves with digests and saves without them (sizes
only, as before digests existed) alternate, each into its own directory, so load from other
processes hits both alike. Then each kind of checkpoint is checked and loaded:

- save overhead: (save with digests - save without) / save without, median of the repetitions;
  each rank hashes only the files it wrote, right after writing them;
- check before a load: ``CheckpointManager.check`` (manifest, listing, every file re-hashed,
  shared between the ranks) as a fraction of the save without digests and of the load itself.

Figures depend on the disk, the page cache (files just written are read back from memory here,
as they are right after a save in training) and the CPU's SHA-256 speed (SHA-NI or not), which
is printed. Prints a readable report and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from trainer_throughput import ckpt_arch, run_two_ranks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model, fewer repetitions")
    p.add_argument("--reps", type=int, default=None, help="saves of each kind (default 5/3)")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sha256_speed() -> float:
    """MB/s of hashlib's SHA-256 on this CPU (one thread, in memory)."""
    block = os.urandom(64 << 20)
    start = time.perf_counter()
    hashlib.sha256(block).hexdigest()
    return 64 / (time.perf_counter() - start)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from llamajob_trainer.checkpoint import CheckpointManager, step_dir_name
    from llamajob_trainer.config import TrainerConfig
    from llamajob_trainer.parallel import init_distributed, parallelize, shutdown_distributed

    env = init_distributed()
    arch = ckpt_arch(args.quick)
    cfg = TrainerConfig.model_validate({
        "batch": {"micro_batch_size": 1, "global_batch_size": env.world_size},
        "data": {"seq_length": 64},
        "parallelism": {"fsdp": True},
        "precision": "fp32",
    })
    pm = parallelize(cfg, arch, env)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
    tokens = torch.randint(0, arch.vocab_size, (1, 65))
    pm.forward_backward([(tokens[:, :-1], tokens[:, 1:])])
    opt.step()  # the Adam moments exist, so the optimizer state has its full size
    root = Path(os.environ["BENCH_CKPT_DIR"])
    managers = {
        kind: CheckpointManager(
            root / kind, keep=1, fingerprint="bench", rank=env.rank, world_size=env.world_size,
            checksums=kind == "digests", log=lambda _msg: None,
        )
        for kind in ("digests", "sizes")
    }
    reps = args.reps or (3 if args.quick else 5)
    saves: dict[str, list[float]] = {kind: [] for kind in managers}
    for rep in range(reps):
        order = list(managers) if rep % 2 == 0 else list(reversed(managers))
        for kind in order:
            dist.barrier()
            start = time.perf_counter()
            managers[kind].save(rep + 1, pm.model_parts, [opt], {})
            saves[kind].append(time.perf_counter() - start)
    checks: dict[str, list[float]] = {kind: [] for kind in managers}
    loads: dict[str, list[float]] = {kind: [] for kind in managers}
    for _ in range(reps):
        for kind, manager in managers.items():
            path = manager.root / step_dir_name(reps)
            dist.barrier()
            start = time.perf_counter()
            problems = manager.check(path, reps)
            checks[kind].append(time.perf_counter() - start)
            assert not problems, problems
            dist.barrier()
            start = time.perf_counter()
            manager._load(path, pm.model_parts, [opt])
            loads[kind].append(time.perf_counter() - start)
    if env.rank == 0:
        newest = root / "digests" / step_dir_name(reps)
        Path(args.worker).write_text(json.dumps({
            "saves": saves, "checks": checks, "loads": loads,
            "bytes": sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()),
            "params": sum(p.numel() for p in pm.parameters()),
        }))
    shutdown_distributed()


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_two_ranks(
        __file__, "--worker", *(["--quick"] if args.quick else []),
        *(["--reps", str(args.reps)] if args.reps else []), timeout=3600,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    speed = sha256_speed()
    raw = run(args)
    med = {k: {kind: statistics.median(v) for kind, v in raw[k].items()}
           for k in ("saves", "checks", "loads")}
    save_with, save_without = med["saves"]["digests"], med["saves"]["sizes"]
    result = {
        "bytes": raw["bytes"],
        "params": raw["params"],
        "sha256_mb_per_s_one_thread": round(speed, 1),
        "save_seconds_with_digests": round(save_with, 3),
        "save_seconds_sizes_only": round(save_without, 3),
        "save_overhead_fraction": round((save_with - save_without) / save_without, 3),
        "check_seconds_digests": round(med["checks"]["digests"], 3),
        "check_seconds_sizes_only": round(med["checks"]["sizes"], 3),
        "check_fraction_of_save": round(med["checks"]["digests"] / save_without, 3),
        "load_seconds": round(med["loads"]["digests"], 3),
        "check_fraction_of_load": round(med["checks"]["digests"] / med["loads"]["digests"], 3),
    }
    gb = raw["bytes"] / 1e9
    print(f"checkpoint of {raw['params'] / 1e6:.0f}M parameters, {gb:.2f} GB on disk, 2 ranks "
          f"(FSDP2); SHA-256 here: {speed:.0f} MB/s on one thread")
    print(f"  save, sizes only     {save_without:7.3f} s (median of {len(raw['saves']['sizes'])})")
    print(f"  save, with digests   {save_with:7.3f} s  -> overhead "
          f"{result['save_overhead_fraction'] * 100:+.1f}% of the save")
    print(f"  check before load    {med['checks']['digests']:7.3f} s  = "
          f"{result['check_fraction_of_save'] * 100:.1f}% of a save, "
          f"{result['check_fraction_of_load'] * 100:.1f}% of the load "
          f"({med['loads']['digests']:.3f} s); sizes only: {med['checks']['sizes']:.3f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
