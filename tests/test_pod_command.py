"""The rendered pod command, run: a two-node CPU job as two "pods" on this machine.

Each pod's container command, environment and mounted config are taken from the manifests the
operator renders (``render_pod``, ``render_configmap``); only what a cluster provides is stood
in for: ``torchrun`` is this interpreter's ``torch.distributed.run``, the rendezvous name of pod
0 (a headless-Service DNS record) is 127.0.0.1 with a free port, the config file path is local.
So the torchrun flags, the static rendezvous at pod 0, the environment and the trainer config
are checked together by a real multi-node run, which a manifest test cannot do.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT
from llamajob import render
from llamajob.jobfile import parse_job
from llamajob.plan import make_plan
from llamajob_trainer import protocol
from trainer_helpers import free_port, prepare_pydoc

NODES = 2


def two_node_job(tmp: Path, process_restarts: int = 0) -> Any:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    spec = obj["spec"]
    spec["restartPolicy"]["processRestarts"] = process_restarts
    spec["cluster"].update(nodes=NODES, processesPerNode=1)
    spec["data"].update(path=str(prepare_pydoc(tmp / "data", spec["data"]["seqLength"])))
    spec["checkpoint"].update(dir=str(tmp / "checkpoints"), everySteps=10)
    spec["compile"].update(cacheDir=str(tmp / "compile-cache"))
    spec["maxSteps"] = 30
    return parse_job(obj)


def pod_process(
    pod: dict[str, Any], config: Path, master_port: int, tmp: Path, rank: int,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Pod `rank`'s DNS name is 127.0.0.{rank + 1}: all of 127/8 is this machine's loopback."""
    container = pod["spec"]["containers"][0]
    argv = list(container["command"])
    assert argv[0] == "torchrun"
    argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
    if "--master_addr" in argv:  # static rendezvous
        argv[argv.index("--master_addr") + 1] = "127.0.0.1"
        argv[argv.index("--master_port") + 1] = str(master_port)
    else:  # c10d: pod 0 hosts the rendezvous; each pod names itself by its address
        argv[argv.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{master_port}"
        argv[argv.index("--local-addr") + 1] = f"127.0.0.{rank + 1}"
    argv[argv.index("--config") + 1] = str(config)
    name = pod["metadata"]["name"]
    env = dict(os.environ)
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    (tmp / name).mkdir()
    env.update(
        TMPDIR=str(tmp / name),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        **{protocol.TERMINATION_LOG_ENV: str(tmp / name / "termination-log")},
    )
    for chaos in (protocol.CHAOS_KILL_AT_STEP_ENV, protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV):
        env.pop(chaos, None)
    env.update(extra_env or {})
    log = (tmp / f"{name}.log").open("w")
    return subprocess.Popen(argv, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            text=True)


def run_gang(
    job: Any, role: str, config: Path, tmp: Path, *, while_running: Any = None,
    env: dict[int, dict[str, str]] | None = None, last_pod_first: bool = False,
) -> list[str]:
    """Start every pod of the gang (`env`: extra environment by pod index), wait for all;
    returns their logs."""
    plan = make_plan(job.spec)
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    pods = [render.render_pod(job, plan, role, 1, rank) for rank in range(plan.pods)]
    order = range(plan.pods - 1, -1, -1) if last_pod_first else range(plan.pods)
    started = {
        rank: pod_process(pods[rank], config, port, tmp, rank, (env or {}).get(rank))
        for rank in order
    }
    procs = [started[rank] for rank in range(plan.pods)]
    try:
        if while_running is not None:
            while_running(procs)
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp / f"{pod['metadata']['name']}.log").read_text() for pod in pods]
    assert codes == [0] * plan.pods, "\n\n".join(log[-3000:] for log in logs)
    return logs


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llamajob_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{", 1)[0]] = float(value)
    return out


def test_rendered_two_node_gang_compiles_trains_and_serves_metrics_from_pod_0(
    tmp_path: Path,
) -> None:
    job = two_node_job(tmp_path)
    plan = make_plan(job.spec)
    assert (plan.pods, plan.world_size) == (NODES, NODES)
    wire = yaml.safe_load(render.render_configmap(job, plan)["data"][render.CONFIG_KEY])
    metrics_port = free_port()
    wire["metricsPort"] = metrics_port  # the pod's fixed port may be taken on this machine
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(wire, sort_keys=False))

    run_gang(job, render.ROLE_COMPILE, config, tmp_path / "compile")

    seen: dict[str, float] = {}

    def watch_rank_0(procs: list[subprocess.Popen[str]]) -> None:
        # The operator reads progress from pod 0 only: rank 0 must be there.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            with contextlib.suppress(OSError):
                seen.update(scrape(metrics_port))
            if seen.get("llamajob_train_step", 0) >= 1:
                return
            time.sleep(0.2)

    logs = run_gang(job, render.ROLE_TRAIN, config, tmp_path / "train",
                    while_running=watch_rank_0)
    assert seen.get("llamajob_train_step", 0) >= 1, "pod 0 never served rank 0's metrics"
    pod0, pod1 = logs
    assert f"world {NODES} = pp 1 x dp {NODES} x tp 1" in pod0
    assert "step 30/30" in pod0 and "done: 30 steps" in pod0
    assert "step 1/30" not in pod1  # only rank 0 logs steps
    done = [p.name for p in sorted((tmp_path / "checkpoints").iterdir())
            if (p / protocol.CHECKPOINT_DONE_MARKER).is_file()]
    assert done == ["step_20", "step_30"]  # keep: 2


def test_process_restarts_resume_in_place_with_rank_0_on_pod_0(tmp_path: Path) -> None:
    """restartPolicy.processRestarts: the rendered c10d command restarts both pods' processes
    in place after rank 0 is killed at step 12; they resume from step_10 without a new gang.
    Pod 1 starts first, so node ranks come from the addresses, not from who joined first."""
    job = two_node_job(tmp_path, process_restarts=1)
    plan = make_plan(job.spec)
    wire = yaml.safe_load(render.render_configmap(job, plan)["data"][render.CONFIG_KEY])
    wire["metricsPort"] = 0
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(wire, sort_keys=False))

    kill = {0: {protocol.CHAOS_KILL_AT_STEP_ENV: "12"}}
    pod0, pod1 = run_gang(job, render.ROLE_TRAIN, config, tmp_path / "train", env=kill,
                          last_pod_first=True)
    assert "chaos: injecting killAtStep (12)" in pod0
    assert "torchrun restarted the processes in place (1 time(s) in this attempt)" in pod0
    assert "resumed from step_10" in pod0 and "done: 30 steps" in pod0
    assert "step 1/30" not in pod1  # rank 0, the one that logs steps, stayed on pod 0
    # Steps 11 and 12 ran twice, before the kill and after the resume: the same losses.
    losses: dict[int, set[str]] = {}
    for line in pod0.splitlines():
        if line.startswith("step ") and "/30 | loss " in line:
            step = int(line.split()[1].split("/")[0])
            losses.setdefault(step, set()).add(line.split(" | ")[1])
    assert sorted(losses) == list(range(1, 31))
    assert all(len(seen) == 1 for seen in losses.values()), losses
    assert sum(line.startswith("step 11/30 ") for line in pod0.splitlines()) == 2
