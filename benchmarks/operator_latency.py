"""Operator latency and scale, against the emulated Kubernetes API of the test suite.

Runs `llamajob operator` as a real process (its RSS is measured) against kmock's emulator with
the realism layer from tests/kube_emulator.py, in this process. Pods never run: the script plays
the kubelet. Timestamps are taken inside the emulator when it applies a write, so they do not
include this script's polling.

1. Restart latency: one 16-node job; for each of N faults, the gang is marked Running, one pod
   is marked Failed, and the time from that write to the creation of the 16th replacement pod
   is recorded (backoffSeconds 0, so this is the operator's reaction time plus the delete ->
   wait-for-gone -> create round trip).
2. Scale: 100 jobs of 16 nodes created at once; time from the first job to the last of the
   1,600 pods; the operator's RSS; API requests per job until the jobs settle.
3. Idle: all pods running and rank 0 reporting a constant step (so the progress timer keeps
   scraping); API requests per job per minute over a quiet window.

Compile is disabled in these jobs: the first gang is the training gang. Prints one JSON line
at the end; figures from an emulator on a shared machine, not from a real API server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import kmock  # noqa: E402
from kube_cluster import metrics_server, node_manifest, wait_for  # noqa: E402
from kube_emulator import EmulatorThread  # noqa: E402

PODS = kmock.resource("", "v1", "pods")
NODES = kmock.resource("", "v1", "nodes")
JOBS = kmock.resource("llamajob.dev", "v1alpha1", "llamatrainingjobs")
NAMESPACES = kmock.resource("", "v1", "namespaces")
OPERATOR_AGENTS = ("kopf/", "llamajob-operator/")
NS = "default"


def job_manifest(name: str, nodes: int) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["cluster"]["nodes"] = nodes
    doc["spec"]["compile"]["enabled"] = False
    doc["spec"]["restartPolicy"] = {"maxRestarts": 1000, "backoffSeconds": 0,
                                    "hangTimeoutSeconds": 0, "avoidFaultyNodes": False}
    return doc


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-train-a{attempt}-{rank}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Steps:
    """Rank 0's metrics for every job from one endpoint (every pod's IP is 127.0.0.1; the
    operator picks its job's sample by the job label, as it does with the real trainer)."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}
        self.requests = 0
        self.server = metrics_server(self._render)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _render(self) -> bytes:
        self.requests += 1
        lines = ["# TYPE llamajob_train_step gauge"]
        lines += [f'llamajob_train_step{{job="{j}",namespace="{NS}"}} {s}'
                  for j, s in list(self.steps.items())]
        lines += ["# TYPE llamajob_train_loss gauge"]
        lines += [f'llamajob_train_loss{{job="{j}",namespace="{NS}"}} 2.5'
                  for j in list(self.steps)]
        return ("\n".join(lines) + "\n").encode()


class Bench:
    def __init__(self, emu: EmulatorThread) -> None:
        self.emu = emu
        self.e = emu.emulator

    def call(self, fn: Any, *args: Any) -> Any:
        return self.emu.call(fn, *args)

    def get(self, res: kmock.resource, name: str, ns: str | None = NS) -> dict[str, Any] | None:
        return self.call(lambda: self.e._get((res, ns, name)))

    def wait(self, predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
        return wait_for(predicate, timeout, interval, what)

    def writes_since(self, index: int) -> list[tuple[float, str, str, str | None, str]]:
        return self.call(lambda: list(self.e.writes[index:]))

    def mark(self) -> int:
        return self.call(lambda: len(self.e.writes))

    def run_pods(self, names: list[str], nodes: list[str]) -> None:
        def do() -> None:
            now = "2026-01-01T00:00:00Z"
            for name, node in zip(names, nodes, strict=True):
                self.e.patch_object(PODS, NS, name, {"spec": {"nodeName": node}})
                self.e.patch_object(PODS, NS, name, {"status": {
                    "phase": "Running", "podIP": "127.0.0.1", "startTime": now,
                    "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0,
                                           "state": {"running": {"startedAt": now}}}],
                }}, "status")

        self.call(do)

    def fail_pod(self, name: str) -> float:
        def do() -> float:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.e.patch_object(PODS, NS, name, {"status": {
                "phase": "Failed",
                "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0,
                                       "state": {"terminated": {
                                           "exitCode": 1, "reason": "Error",
                                           "finishedAt": stamp}}}],
            }}, "status")
            return time.monotonic()

        return float(self.call(do))

    def running(self, job: str, attempt: int) -> bool:
        obj = self.get(JOBS, job) or {}
        st = obj.get("status") or {}
        cond = next((c for c in st.get("conditions", []) if c["type"] == "Running"), {})
        return st.get("attempt") == attempt and cond.get("status") == "True"

    def operator_requests(self) -> list[tuple[str, str, str | None]]:
        def snap() -> list[tuple[str, str, str | None]]:
            out = []
            for r in self.e._requests:
                if r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
                    plural = r.resource.plural if r.resource is not None else None
                    if plural and r.subresource:
                        plural = f"{plural}/{r.subresource}"
                    out.append((str(r.method.value).upper(), r.url.path, plural))
            return out

        return self.call(snap)


def start_operator(url_kubeconfig: Path, trainer_port: int, log: Path) -> tuple[
    subprocess.Popen[bytes], int
]:
    metrics_port, liveness_port = free_port(), free_port()
    env = dict(os.environ, KUBECONFIG=str(url_kubeconfig))
    argv = [str(Path(sys.executable).parent / "llamajob"), "operator",
            "--metrics-port", str(metrics_port), "--liveness-port", str(liveness_port),
            "--trainer-metrics-port", str(trainer_port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited early:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=1):
                return proc, metrics_port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("operator did not become live")


def restart_latency(b: Bench, faults: int) -> list[float]:
    job, size = "restart", 16
    nodes = [f"restart-node-{r}" for r in range(size)]
    b.call(lambda: [b.e.put_object(NODES, node_manifest(n)) for n in nodes])
    b.call(b.e.put_object, JOBS, job_manifest(job, size))
    latencies = []
    for attempt in range(1, faults + 1):
        names = [pod_name(job, attempt, r) for r in range(size)]
        b.wait(lambda names=names: all(b.get(PODS, n) for n in names), 30,
               f"gang of attempt {attempt}")
        b.run_pods(names, nodes)
        b.wait(lambda attempt=attempt: b.running(job, attempt), 30, "gang running")
        time.sleep(0.05)  # let the status write of the formed gang settle
        start = b.mark()
        t0 = b.fail_pod(names[attempt % size])
        wanted = {pod_name(job, attempt + 1, r) for r in range(size)}

        def created(start: int = start, wanted: set[str] = wanted) -> float | None:
            times = {name: t for t, kind, plural, _, name in b.writes_since(start)
                     if kind == "ADDED" and plural == "pods" and name in wanted}
            return max(times.values()) if len(times) == len(wanted) else None

        t1 = b.wait(created, 60, f"replacement gang {attempt + 1}", interval=0.01)
        latencies.append(t1 - t0)
    b.call(lambda: b.e._delete(JOBS, NS, job))
    return latencies


def scale(b: Bench, jobs: int, size: int, operator_pid: int) -> dict[str, Any]:
    names = [f"bench-{j}" for j in range(jobs)]
    b.call(lambda: [b.e.put_object(NODES, node_manifest(f"{n}-node-{r}"))
                    for n in names for r in range(size)])
    time.sleep(1.0)  # let the node events drain before the clock starts
    b.emu.clear_requests()
    start = b.mark()
    t0 = time.monotonic()
    b.call(lambda: [b.e.put_object(JOBS, job_manifest(n, size)) for n in names])
    wanted = {pod_name(n, 1, r) for n in names for r in range(size)}

    def all_pods() -> float | None:
        times = [t for t, kind, plural, _, name in b.writes_since(start)
                 if kind == "ADDED" and plural == "pods" and name in wanted]
        return max(times) if len(times) == len(wanted) else None

    t_last = b.wait(all_pods, 300, f"{len(wanted)} pods", interval=0.05)
    rss_after_create = rss_mib(operator_pid)[0]
    time.sleep(3.0)  # trailing status writes
    requests = b.operator_requests()
    return {
        "jobs100_all_pods_seconds": t_last - t0,
        "rss_after_create_mib": rss_after_create,
        "api_requests_per_job": len(requests) / jobs,
        "api_requests_by_verb": dict(Counter(f"{m} {p}" for m, _, p in requests)),
        "names": names,
    }


def idle(b: Bench, names: list[str], size: int, steps: Steps, seconds: float,
         interval: float) -> dict[str, Any]:
    for n in names:
        steps.steps[n] = 100
    for n in names:
        b.run_pods([pod_name(n, 1, r) for r in range(size)],
                   [f"{n}-node-{r}" for r in range(size)])

    def settled() -> bool:
        for n in names:
            st = (b.get(JOBS, n) or {}).get("status") or {}
            if st.get("step") != 100 or not b.running(n, 1):
                return False
        return True

    b.wait(settled, 120 + 2 * interval, "every job running and reporting step 100", 0.5)
    time.sleep(2.0)
    b.emu.clear_requests()
    scrapes = steps.requests
    time.sleep(seconds)
    requests = b.operator_requests()
    return {
        "idle_requests_per_job_minute": len(requests) / len(names) * 60.0 / seconds,
        "idle_window_seconds": seconds,
        "idle_requests_total": len(requests),
        "idle_requests_by_verb": dict(Counter(f"{m} {p}" for m, _, p in requests)),
        "idle_scrapes_of_rank0": steps.requests - scrapes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    steps = Steps()
    with tempfile.TemporaryDirectory() as tmp, EmulatorThread(record_writes=True) as emu:
        emu.install_crd()
        b = Bench(emu)
        b.call(b.e.put_object, NAMESPACES, {"metadata": {"name": NS}})
        kubeconfig = emu.write_kubeconfig(Path(tmp) / "kubeconfig")
        log = Path(tmp) / "operator.log"
        proc, metrics_port = start_operator(kubeconfig, steps.port, log)
        try:
            latencies = restart_latency(b, args.faults)
            print(f"restart latency over {len(latencies)} faults: "
                  f"p50 {statistics.median(latencies):.3f} s, "
                  f"p99 {percentile(latencies, 0.99):.3f} s, max {max(latencies):.3f} s",
                  file=sys.stderr)
            sc = scale(b, args.jobs, args.nodes, proc.pid)
            print(f"{args.jobs} jobs x {args.nodes} pods: all pods after "
                  f"{sc['jobs100_all_pods_seconds']:.2f} s, "
                  f"{sc['api_requests_per_job']:.1f} API requests per job "
                  f"{sc['api_requests_by_verb']}", file=sys.stderr)
            quiet = idle(b, sc.pop("names"), args.nodes, steps, args.idle_seconds, 20.0)
            print(f"idle: {quiet['idle_requests_total']} operator requests in "
                  f"{args.idle_seconds:.0f} s while rank 0 was scraped "
                  f"{quiet['idle_scrapes_of_rank0']} times", file=sys.stderr)
            rss, peak = rss_mib(proc.pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                own = resp.read().decode()
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    own_restart = [line for line in own.splitlines()
                   if line.startswith("llamajob_restart_latency_seconds_")
                   and not line.startswith("llamajob_restart_latency_seconds_bucket")]
    result = {
        "restart_p50_seconds": round(statistics.median(latencies), 4),
        "restart_p99_seconds": round(percentile(latencies, 0.99), 4),
        "restart_max_seconds": round(max(latencies), 4),
        "faults": len(latencies),
        "jobs100_all_pods_seconds": round(sc["jobs100_all_pods_seconds"], 3),
        "jobs": args.jobs,
        "pods_per_job": args.nodes,
        "operator_rss_mib": round(rss, 1),
        "operator_rss_peak_mib": round(peak, 1),
        "api_requests_per_job": round(sc["api_requests_per_job"], 2),
        "api_requests_by_verb": sc["api_requests_by_verb"],
        "idle_requests_per_job_minute": round(quiet["idle_requests_per_job_minute"], 4),
        "idle_window_seconds": quiet["idle_window_seconds"],
        "idle_scrapes_of_rank0": quiet["idle_scrapes_of_rank0"],
        "idle_requests_by_verb": quiet["idle_requests_by_verb"],
        "operator_restart_latency_histogram": own_restart,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
