"""The operator's decisions: (job with its last status, what is observed, now) -> actions + status.

Pure: no I/O, no clock (``now`` is an argument), no Kubernetes client. The kopf shell
(``handlers.py``, ``worker.py``) and the local runner (``local.py``) both feed this function and
carry out what it returns, so they cannot diverge in their decisions. Its inputs and outputs are
plain data (``observed.py``, ``actions.py``); the verdict on one pod is in ``faults.py``, the
status vocabulary in ``status.py``, and the Events follow from the status change
(``events.py``).

Lifecycle:

    Pending -> Compiling -> Training -> Succeeded
                   \\           \\
                    +-> Restarting -> (Compiling | Training) ...   -> Failed

    (any phase but Succeeded and Failed) <-> Suspended, while spec.suspend is true

Choices worth knowing:
- **One attempt counter** for both roles. Compile and training pods of the same attempt differ by
  role (``{job}-compile-a1-0``, ``{job}-train-a1-0``). A fault in either role starts attempt+1 in
  the role that was not finished: compile again if it never completed (condition Compiled is not
  True), training otherwise. ``restarts`` counts only the attempts that faults caused.
- **Spec edits** reach a running gang by a planned restart. Every attempt records the spec
  revision its pods run (``render.spec_revision``: the whole spec but ``restartPolicy``, which
  applies at once). When the spec's revision moves on, the gang is deleted with its pods' own
  grace period (so the trainer saves the step it is on), and the next attempt starts right away
  from that checkpoint with the new spec: no backoff, not counted against maxRestarts, compiling
  first when compile is enabled and the edit changed the compile key. An edit that makes the
  spec invalid fails the job like any invalid spec.
- **Suspending** (``spec.suspend``) stops the gang the same way, with the pods' own grace
  period, and starts none while it is true; the phase is Suspended and so is a condition.
  Setting it back to false starts the next attempt once those pods are gone, without backoff
  and not counted in ``restarts``, compiling first only if the compile step never finished.
  It is not an edit: it does not change the spec revision.
- **A job failed by its spec starts over once the spec is edited** (a new generation): InvalidSpec,
  or TrainerError (the trainer refused its config, data or checkpoints). It continues with the
  next attempt number, so no pod name is reused, and resumes from the newest checkpoint.
- **Checkpoints fix the model.** Once the job has saved a checkpoint, the status records its
  directory and model fingerprint (architecture and sequence length, as the trainer checks). An
  edit that changes the fingerprint but keeps the directory and resumes is an invalid spec:
  the job fails at once (its pods save on their way out) instead of compiling and starting a
  gang whose trainer would refuse the checkpoints.
- **Level-triggered creation.** Until every pod of the current gang has been seen running at
  once (condition Running=True), each reconcile asks for the pods it does not observe; the shell
  treats AlreadyExists as success. So a pod that vanished before the gang formed is simply
  recreated (the others are still waiting at the rendezvous), and an operator that crashed
  between creating pod 3 and pod 4 finishes the job on its next pass. After the gang formed, a
  missing pod is a fault (PodDeleted): the other ranks cannot continue without it.
- **Faults** end the attempt: a failed pod, an eviction or other node-caused removal, a pod on a
  node that is unhealthy or gone, a pod deleted by someone else, or no step progress for
  hangTimeoutSeconds. The whole gang is deleted, the phase is Restarting until the backoff
  (backoffSeconds * 2^restarts, at most 600 s) has passed and the old pods have stopped, then
  the next attempt starts. Exit codes in ``protocol.PERMANENT_EXIT_CODES`` or a termination
  message with ``permanent: true`` fail the job instead.
- **Faulty nodes** (with avoidFaultyNodes) are only those with a node-level cause: unhealthy or
  gone node, node lost, eviction, kubelet termination. A crashing process or a hang says nothing
  reliable about its node (the first rank to die is often the victim, not the cause). The next
  gangs prefer other nodes; a faulty node is used again only when nothing else fits (HyperPod
  may repair a node in place, and a cluster without spares must not stall).
- **Pending gangs say why**: while pods of a gang that has not formed cannot be scheduled, the
  Running condition's reason is PodsUnschedulable with the scheduler's message, and an
  ``Unschedulable`` Warning event is emitted once.
- **Events** are derived from the old and the new status, never from what the pods look like,
  so a replayed watch or a second identical call emits nothing.

Idempotency: once the shell has carried out a decision (see :func:`apply_actions`), reconciling
again with the returned status yields no create, delete or event. Called again with an
*unchanged* observation, it repeats only the same idempotent requests (creates of pods it does
not see yet, deletes of pods not yet marked deleting) and no events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from . import render
from .actions import (
    Action,
    CreateObject,
    Decision,
    DeletePods,
    RequeueAfter,
)
from .api import Fault, LlamaTrainingJob, LlamaTrainingJobStatus
from .events import events
from .faults import (
    HANG,
    INVALID_IMAGE,
    NODE_GONE,
    NODE_UNHEALTHY,
    POD_DELETED,
    Finding,
    is_node_fault,
    pod_finding,
)
from .jobfile import SpecError
from .observed import Observed, ObservedPod
from .plan import Plan, make_plan
from .status import (
    BACKOFF_LIMIT_EXCEEDED,
    COMPILE_DISABLED,
    COMPILE_FINISHED,
    COMPILE_SKIPPED,
    COMPILED,
    COMPILING,
    FAILED,
    INVALID_SPEC,
    PENDING,
    PODS_NOT_STARTING,
    PODS_UNSCHEDULABLE,
    RESTARTING,
    RESUMED,
    RUNNING,
    SPEC_CHANGED,
    SUCCEEDED,
    SUSPENDED,
    TERMINAL,
    TRAINER_ERROR,
    TRAINING,
    TRAINING_DIVERGED,
    VALIDATED,
    aware,
    clip,
    get_condition,
    is_true,
    parse_time,
    set_condition,
    timestamp,
)

RESTART_GRACE_SECONDS = 30  # Kubernetes' default grace period
MAX_BACKOFF_SECONDS = 600.0
MAX_FAULTS = 10  # status.faults keeps the most recent ones

_STARTED_PHASES = ("Running", "Succeeded")
_LIVE_PHASES = ("Pending", "Running", "Unknown")


def backoff_seconds(base: float, restarts: int) -> float:
    """Delay before the next attempt after ``restarts`` restarts so far."""
    if base <= 0:
        return 0.0
    # Cap the exponent first: 2**1000 overflows a float.
    return min(base * 2 ** min(restarts, 32), MAX_BACKOFF_SECONDS)


# --- the reconciler ---------------------------------------------------------------------------
class _Pass:
    """One reconcile pass: a mutable copy of the status and the actions collected so far."""

    def __init__(
        self,
        job: LlamaTrainingJob,
        observed: Observed,
        now: datetime,
        old: LlamaTrainingJobStatus,
        plan: Plan | None,
    ) -> None:
        self.job, self.obs, self.now, self.plan = job, observed, aware(now), plan
        self.old = old
        self.st = old.model_copy(deep=True)
        self.gen = job.metadata.generation
        self.policy = job.spec.restart_policy
        self.revision = render.spec_revision(job)
        self.compile_key: str | None = None  # set by run() once the plan is valid
        self.creates: list[CreateObject] = []
        self.requeue: list[float] = []

    # helpers
    def cond(self, type_: str, value: str, reason: str, message: str) -> None:
        set_condition(self.st, type_, value, reason, message, self.now, self.gen)

    def role(self) -> str:
        return render.ROLE_COMPILE if self.st.phase == COMPILING else render.ROLE_TRAIN

    def pod_name(self, role: str, attempt: int, rank: int) -> str:
        return render.pod_name(self.job.metadata.name, role, attempt, rank)

    def current_gang(self) -> dict[int, ObservedPod]:
        assert self.plan is not None
        role, attempt = self.role(), self.st.attempt
        gang: dict[int, ObservedPod] = {}
        for p in self.obs.pods:
            if p.role == role and p.attempt == attempt and 0 <= p.rank < self.plan.pods:
                gang.setdefault(p.rank, p)
        return gang

    def in_current_gang(self, pod: ObservedPod) -> bool:
        assert self.plan is not None
        return (
            self.st.phase in (COMPILING, TRAINING)
            and pod.role == self.role()
            and pod.attempt == self.st.attempt
            and 0 <= pod.rank < self.plan.pods
        )

    # entry points
    def run(self) -> None:
        """A valid, non-terminal job."""
        plan, spec, st = self.plan, self.job.spec, self.st
        assert plan is not None
        st.observed_generation = self.gen
        st.world_size = plan.world_size
        st.pods = plan.pods
        st.max_steps = spec.total_steps()
        # The compile pods may report the key they used; theirs wins and is kept.
        self.compile_key = spec.compile_key(plan.backend, spec.cluster.image, plan.device)
        st.compile_key = st.compile_key or self.compile_key
        self.cond(
            VALIDATED,
            "True",
            "Valid",
            f"world {plan.world_size} = {plan.pods} pod(s) x {plan.processes_per_node} ranks "
            f"(tensor {plan.tensor}, pipeline {plan.pipeline}, data {plan.data_parallel}) on "
            f"{plan.instance.name}, backend {plan.backend}",
        )
        if not spec.compile.enabled and not is_true(st, COMPILED):
            self.cond(COMPILED, "True", COMPILE_DISABLED, "spec.compile.enabled is false")
        if not self.obs.service:
            self.creates.append(CreateObject(render.render_service(self.job)))
        if render.configmap_name(self.job.metadata.name, self.revision) not in self.obs.configmaps:
            self.creates.append(CreateObject(render.render_configmap(self.job, plan)))

        if spec.suspend:
            self.suspend()
        elif st.phase in (None, PENDING):
            st.attempt = max(st.attempt, 1)
            self.start_gang()
        elif st.phase == RESTARTING:
            self.restarting()
        elif st.phase == SUSPENDED:
            self.resume()
        else:
            self.gang()

    def start_gang(self) -> None:
        """Enter Compiling or Training for the current attempt (pods follow in gang())."""
        st = self.st
        # After an edit, compile again unless the compile key is the one already compiled (a
        # key the compile pods reported that differs from ours also compiles again: the compile
        # step then finds its graphs cached and skips itself).
        recompile = (
            st.revision not in (None, self.revision)
            and self.job.spec.compile.enabled
            and self.compile_key != st.compile_key
        )
        if recompile:
            st.compile_key = self.compile_key
        st.revision = self.revision
        compiled = is_true(st, COMPILED) and not recompile
        st.phase = TRAINING if compiled else COMPILING
        if not compiled:
            why = " (spec changed)" if recompile else ""
            self.cond(COMPILED, "False", "Compiling", f"attempt {st.attempt}: compiling{why}")
        st.restart_after = None
        self.cond(RUNNING, "False", "PodsStarting", f"attempt {st.attempt}: starting pods")
        if st.start_time is None:
            st.start_time = timestamp(self.now)
        self.gang()

    def gang(self) -> None:
        """Compiling or Training: watch the current gang, create what is missing."""
        plan, st = self.plan, self.st
        assert plan is not None
        role = self.role()
        gang = self.current_gang()
        formed = is_true(st, RUNNING)
        if st.revision is None:
            st.revision = self.revision  # a gang started by an operator without revisions
        edited = st.revision != self.revision

        findings: list[Finding] = []
        for rank in range(plan.pods):
            pod = gang.get(rank)
            if pod is None:
                # After an edit the gang size may differ: the gang is replaced anyway.
                if formed and not edited:
                    name = self.pod_name(role, st.attempt, rank)
                    findings.append(
                        Finding(
                            rank, name, None, POD_DELETED, "pod disappeared after the gang formed"
                        )
                    )
                continue
            f = pod_finding(pod, self.obs.nodes)
            if f is not None:
                findings.append(f)
        permanent = [f for f in findings if f.permanent]
        if permanent and all(f.reason == INVALID_IMAGE for f in permanent):
            first = min(permanent, key=lambda f: f.rank)
            self.record([first])
            self.fail(INVALID_SPEC, f"spec.cluster.image: pod {first.pod}: {first.message}")
            return
        if permanent:
            self.fail_trainer(permanent)
            return
        diverged = [f for f in findings if f.reason == TRAINING_DIVERGED]
        if diverged:
            self.diverged(min(diverged, key=lambda f: f.rank), gang, findings)
            return
        if findings:
            self.fault(findings)
            return

        if len(gang) == plan.pods and all(p.phase == "Succeeded" for p in gang.values()):
            if role == render.ROLE_COMPILE:
                self.compile_done(gang)
                self.gang()  # the training gang of the same attempt
            else:
                self.apply_progress()
                self.succeed()
            return
        if edited:
            self.respec()
            return

        # Only reached with every rank present or the gang not yet formed (a missing rank of a
        # formed gang is a fault above), so this never recreates one rank of a running gang.
        avoid = st.faulty_nodes if self.policy.avoid_faulty_nodes else []
        for rank in range(plan.pods):
            if rank not in gang:
                manifest = render.render_pod(self.job, plan, role, st.attempt, rank, avoid)
                self.creates.append(CreateObject(manifest, role, st.attempt, rank))
        started = sum(1 for p in gang.values() if p.phase in _STARTED_PHASES and not p.deleting)
        what = "compile" if role == render.ROLE_COMPILE else "training"
        counts = f"attempt {st.attempt}: {started}/{plan.pods} {what} pod(s) running"
        waiting = [p for p in gang.values() if p.unschedulable and not p.deleting]
        stuck = [p for p in gang.values() if p.not_starting and not p.deleting]
        running = get_condition(st, RUNNING)
        if started == plan.pods:
            self.cond(RUNNING, "True", "AllPodsRunning", counts)
        elif waiting:
            # Say why the job is stuck (no capacity, wrong instance type, a missing claim...).
            counts += (
                f"; {len(waiting)} pod(s) cannot be scheduled, e.g. {waiting[0].name}: "
                f"{waiting[0].unschedulable}"
            )
            self.cond(RUNNING, "False", PODS_UNSCHEDULABLE, counts)
        elif stuck:
            # Placed but not starting (image pull, a missing Secret...): these pods hold their
            # nodes, so say so; the kubelet keeps retrying and the job goes on once it can.
            counts += (
                f"; {len(stuck)} pod(s) cannot start, e.g. {stuck[0].name}: "
                f"{stuck[0].not_starting}"
            )
            self.cond(RUNNING, "False", PODS_NOT_STARTING, counts)
        elif running is not None and running.reason == PODS_NOT_STARTING:
            # Between two of the kubelet's retries the reason may blank out: keep the condition
            # until the gang runs rather than flip back and forth (each flip, another Warning).
            counts += "; waiting for the pod(s) that could not start"
            self.cond(RUNNING, "False", PODS_NOT_STARTING, counts)
        else:
            self.cond(RUNNING, "False", "PodsStarting", counts)
        if role == render.ROLE_TRAIN:
            self.apply_progress()
            if self.hang_check(gang):
                return
            step = f", step {st.step}/{st.max_steps}" if st.step is not None else ""
            st.message = counts + step
        else:
            st.message = counts

    def respec(self) -> None:
        """Replace the gang because the spec changed: a planned restart, not a fault."""
        st = self.st
        training = self.role() == render.ROLE_TRAIN
        if training:
            self.apply_progress()
        st.phase = RESTARTING
        st.restart_after = timestamp(self.now)
        saving = training and self.job.spec.checkpoint.save_on_terminate
        st.message = (
            f"attempt {st.attempt}: spec changed (generation {self.gen}, revision "
            f"{self.revision}); its pods stop within their termination grace period"
            f"{' (the trainer saves its current step)' if saving else ''}, then attempt "
            f"{st.attempt + 1} starts with the new spec"
        )
        self.cond(RUNNING, "False", SPEC_CHANGED, st.message)

    def suspend(self) -> None:
        """spec.suspend: stop the gang as an edit does (its pods get their own grace period, so
        the trainer saves its step) and start nothing until it is false again."""
        st, plan = self.st, self.plan
        assert plan is not None
        was = st.phase
        if st.phase == COMPILING:
            gang = self.current_gang()
            if len(gang) == plan.pods and all(p.phase == "Succeeded" for p in gang.values()):
                self.compile_done(gang)  # done: the next attempt goes straight to training
        if st.phase == TRAINING:
            self.apply_progress()
            gang = self.current_gang()
            if len(gang) == plan.pods and all(p.phase == "Succeeded" for p in gang.values()):
                self.succeed()  # finished before the suspension reached it
                return
        st.phase = SUSPENDED
        st.restart_after = None
        stopping = sum(1 for p in self.obs.pods if p.phase in _LIVE_PHASES)
        if was != SUSPENDED:
            saving = was == TRAINING and self.job.spec.checkpoint.save_on_terminate
            why = (
                f"attempt {st.attempt}'s pods stop within their termination grace period"
                f"{' (the trainer saves its current step)' if saving else ''}"
                if was in (COMPILING, TRAINING) else "no attempt starts while it is"
            )
            self.cond(SUSPENDED, "True", SUSPENDED, f"spec.suspend is true: {why}")
            self.cond(RUNNING, "False", SUSPENDED, "job suspended")
        st.message = "suspended (spec.suspend is true)" + (
            f"; {stopping} pod(s) still stopping" if stopping else ""
        )

    def resume(self) -> None:
        """spec.suspend back to false: the next attempt starts once the suspended pods are gone
        (they hold their nodes' devices), without backoff and not counted in restarts."""
        st = self.st
        if any(self.blocks_restart(p) for p in self.obs.pods):
            st.message = "resuming: waiting for the suspended pods to stop"
            return  # their deletion is a pod event: the shell calls again
        st.attempt += 1
        self.cond(SUSPENDED, "False", RESUMED, f"spec.suspend is false: attempt {st.attempt}")
        self.start_gang()

    def planned_restart(self) -> bool:
        running = get_condition(self.st, RUNNING)
        return self.st.phase == RESTARTING and running is not None and (
            running.reason == SPEC_CHANGED
        )

    def hang_check(self, gang: Mapping[int, ObservedPod]) -> bool:
        timeout = self.policy.hang_timeout_seconds
        running = get_condition(self.st, RUNNING)
        if timeout <= 0 or running is None or running.status != "True":
            return False
        since = parse_time(running.last_transition_time) or self.now
        progressed = parse_time(self.st.last_progress_time)
        ref = max(since, progressed) if progressed else since
        # Durations, never ref + timeout: a timeout of millennia is past datetime's year 9999
        # (and past timedelta's range), and an older CRD admits any integer here.
        elapsed = (self.now - ref).total_seconds()
        if elapsed < timeout:
            # Look again at least daily rather than hold one timer for centuries; min() before
            # the subtraction, as an integer beyond a float's range cannot become one.
            recheck = 86400.0
            self.requeue.append(min(timeout, elapsed + recheck) - elapsed)
            return False
        rank0 = gang.get(0)
        last = f"step {self.st.step}" if self.st.step is not None else "before the first step"
        self.fault(
            [
                Finding(
                    0,
                    rank0.name if rank0 else self.pod_name(render.ROLE_TRAIN, self.st.attempt, 0),
                    rank0.node if rank0 else None,
                    HANG,
                    f"no step progress for {timeout} s (last seen {last})",
                )
            ]
        )
        return True

    def apply_progress(self) -> None:
        p, st = self.obs.progress, self.st
        if p is None:
            return
        at = aware(p.observed_at)
        total = st.max_steps or self.job.spec.total_steps()
        if p.step is not None and p.step != st.step:
            prev_step, prev_time = st.step, parse_time(st.last_progress_time)
            st.step = p.step
            st.last_progress_time = timestamp(at)
            if prev_step is not None and prev_time is not None and p.step > prev_step:
                elapsed = (at - prev_time).total_seconds()
                if elapsed > 0:
                    rate = (p.step - prev_step) / elapsed
                    st.eta_seconds = round(max(total - p.step, 0) / rate, 1)
        if p.loss is not None and math.isfinite(p.loss):
            st.loss, st.loss_non_finite = p.loss, None
        if p.validation_loss is not None and math.isfinite(p.validation_loss):
            st.validation_loss = p.validation_loss
        if p.process_restarts is not None:
            st.process_restarts = p.process_restarts
        if p.checkpoints_quarantined is not None:
            st.checkpoints_quarantined = p.checkpoints_quarantined
        if p.tokens_per_second is not None:
            st.tokens_per_second = p.tokens_per_second
        if p.mfu is not None:
            st.mfu = p.mfu
        if p.last_checkpoint_step is not None:
            st.last_checkpoint_step = p.last_checkpoint_step
            if st.revision == self.revision:  # the pods run this spec, so they saved for it
                st.checkpoint_dir = self.job.spec.checkpoint.dir
                st.checkpoint_fingerprint = self.job.spec.training_fingerprint()
        if st.eta_seconds is None and p.tokens_per_second and st.step is not None:
            # No step interval measured yet: fall back to the trainer's own throughput.
            tokens_left = max(total - st.step, 0) * self.job.spec.tokens_per_step()
            st.eta_seconds = round(tokens_left / p.tokens_per_second, 1)

    def compile_done(self, gang: Mapping[int, ObservedPod]) -> None:
        st = self.st
        messages = [gang[r].termination_message for r in sorted(gang)]
        cached = any(m.get("compileCached") is True for m in messages)
        key = next((str(m["compileKey"]) for m in messages if m.get("compileKey")), None)
        st.compile_key = key or st.compile_key
        if cached:
            self.cond(
                COMPILED,
                "True",
                COMPILE_SKIPPED,
                f"graphs for compile key {st.compile_key} already cached",
            )
        else:
            self.cond(
                COMPILED,
                "True",
                COMPILE_FINISHED,
                f"attempt {st.attempt}: graphs compiled into "
                f"{self.job.spec.compile.cache_dir} (key {st.compile_key})",
            )
        st.phase = TRAINING
        self.cond(RUNNING, "False", "PodsStarting", f"attempt {st.attempt}: starting pods")

    def succeed(self) -> None:
        st = self.st
        st.phase = SUCCEEDED
        st.completion_time = timestamp(self.now)
        st.restart_after = None
        st.eta_seconds = 0.0
        st.message = f"all {st.pods} training pod(s) finished (attempt {st.attempt})"
        self.cond(SUCCEEDED, "True", "AllRanksSucceeded", st.message)
        self.cond(RUNNING, "False", SUCCEEDED, "job finished")

    def fail(self, reason: str, message: str) -> None:
        st = self.st
        st.phase = FAILED
        st.message = clip(message)
        st.completion_time = st.completion_time or timestamp(self.now)
        st.restart_after = None
        self.cond(FAILED, "True", reason, message)
        self.cond(RUNNING, "False", FAILED, "job failed")

    def record(self, findings: Iterable[Finding]) -> None:
        st = self.st
        for f in findings:
            st.faults.append(
                Fault(
                    attempt=st.attempt,
                    pod=f.pod,
                    node=f.node,
                    reason=f.reason,
                    message=clip(f.message),
                    time=timestamp(self.now),
                )
            )
        st.faults = st.faults[-MAX_FAULTS:]

    def fail_trainer(self, findings: list[Finding]) -> None:
        first = min(findings, key=lambda f: f.rank)
        self.record([first])
        self.fail(
            TRAINER_ERROR,
            f"pod {first.pod} (rank {first.rank}) stopped with an error restarting cannot fix: "
            f"{first.message}",
        )

    def diverged(
        self, first: Finding, gang: Mapping[int, ObservedPod], findings: list[Finding]
    ) -> None:
        """A non-finite loss or gradient norm stopped the trainer before it saved anything.
        The status says so honestly (loss null, lossNonFinite); the policy decides the rest."""
        st = self.st
        pod = gang.get(first.rank)
        tm = pod.termination_message if pod is not None else {}
        step, word = tm.get("step"), tm.get("loss")
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            st.step = step
        if word in ("nan", "inf", "-inf"):
            st.loss, st.loss_non_finite = None, word
        if self.policy.on_divergence == "Rollback":
            self.fault(findings)  # a restart resumes from the newest (good) checkpoint
            return
        self.record([first])
        self.fail(TRAINING_DIVERGED, f"pod {first.pod}: {first.message}")

    def fault(self, findings: list[Finding]) -> None:
        st, policy = self.st, self.policy
        ordered = sorted(findings, key=lambda f: (not f.node_level, f.rank))
        node_level = [f for f in ordered if f.node_level]
        recorded = node_level or ordered[:1]
        self.record(recorded)
        if policy.avoid_faulty_nodes:
            for f in node_level:
                if f.node and f.node not in st.faulty_nodes:
                    st.faulty_nodes.append(f.node)
        first = ordered[0]
        others = len(ordered) - len(recorded)
        summary = f"attempt {st.attempt}: {first.reason} on pod {first.pod}: {first.message}"
        if others:
            summary += f" (and {others} more pod(s))"
        if st.restarts >= policy.max_restarts:
            self.fail(
                TRAINING_DIVERGED if first.reason == TRAINING_DIVERGED else BACKOFF_LIMIT_EXCEEDED,
                f"{summary}; no restarts left after {st.restarts} "
                f"(maxRestarts {policy.max_restarts})",
            )
            return
        delay = backoff_seconds(policy.backoff_seconds, st.restarts)
        st.phase = RESTARTING
        st.restart_after = timestamp(self.now + timedelta(seconds=delay))
        st.message = clip(f"{summary}; next attempt in {delay:g} s")
        self.cond(RUNNING, "False", "Restarting", st.message)
        if delay > 0:
            self.requeue.append(delay)

    def restarting(self) -> None:
        st = self.st
        self.late_node_faults()
        ahead = [p.attempt for p in self.obs.pods if p.attempt > st.attempt and not p.deleting]
        if ahead:
            # Pods of a later attempt exist: that attempt was started but its status write was
            # lost (operator crash). Adopt it rather than tear it down and create it again.
            if not self.planned_restart():
                st.restarts += max(ahead) - st.attempt
            st.attempt = max(ahead)
            self.start_gang()
            return
        due = parse_time(st.restart_after) or self.now
        if self.now < due:
            self.requeue.append((due - self.now).total_seconds())
            return
        if any(self.blocks_restart(p) for p in self.obs.pods):
            return  # their deletion is a pod event: the shell calls again
        if not self.planned_restart():
            st.restarts += 1
        st.attempt += 1
        self.start_gang()

    def late_node_faults(self) -> None:
        """A node verdict that arrives after the pod failure it explains (the node's watch event
        and the pod's race each other) still marks the node, as long as the old pod is seen."""
        st = self.st
        known = {(f.attempt, f.pod) for f in st.faults if is_node_fault(f.reason)}
        late = []
        for pod in self.obs.pods:
            if pod.attempt != st.attempt or (pod.attempt, pod.name) in known:
                continue
            f = pod_finding(pod, self.obs.nodes)
            if f is not None and f.reason in (NODE_UNHEALTHY, NODE_GONE):
                late.append(f)
        if not late:
            return
        self.record(late)
        if self.policy.avoid_faulty_nodes:
            for f in late:
                if f.node and f.node not in st.faulty_nodes:
                    st.faulty_nodes.append(f.node)

    def blocks_restart(self, pod: ObservedPod) -> bool:
        """An old pod still running holds its node's devices; wait for it. Pods on a dead node
        never finish terminating by themselves, and that node is avoided anyway."""
        if pod.phase not in ("Pending", "Running"):
            return False
        health = self.obs.nodes.get(pod.node) if pod.node else None
        return health is None or health.healthy

    def cleanup(self) -> list[DeletePods]:
        """Delete every pod that is not part of the current gang (and, when terminal, only those
        still running: finished pods stay for their logs)."""
        st = self.st
        terminal = st.phase in TERMINAL
        names = sorted(
            p.name
            for p in self.obs.pods
            if not p.deleting
            and (p.phase in _LIVE_PHASES if terminal else not self.in_current_gang(p))
        )
        if not names:
            return []
        if self.planned_restart():
            # Healthy ranks: their full grace period lets the trainer save the current step.
            return [DeletePods(tuple(names), f"spec changed during attempt {st.attempt}")]
        if st.phase == SUSPENDED:
            return [DeletePods(tuple(names), f"job suspended during attempt {st.attempt}")]
        if st.phase == RESTARTING:
            # The survivors of a fault cannot save (a save is collective and a peer is gone)
            # and often hang in a collective; the new gang waits for them to go, so the long
            # grace period meant for saving would only delay the restart.
            return [DeletePods(
                tuple(names), f"gang restart after attempt {st.attempt}", RESTART_GRACE_SECONDS
            )]
        why = f"job {st.phase.lower()}" if terminal else "not part of the current gang"
        return [DeletePods(tuple(names), why)]


def _decide(p: _Pass) -> Decision:
    actions: list[Action] = [*p.creates, *p.cleanup(), *events(p.job, p.old, p.st)]
    if p.requeue:
        actions.append(RequeueAfter(max(min(p.requeue), 0.0)))
    return Decision(tuple(actions), p.st)


def _invalid_pass(p: _Pass, problems: list[SpecError]) -> Decision:
    message = "; ".join(str(e) for e in problems) or "invalid spec"
    st = p.st
    st.observed_generation = p.gen
    p.cond(VALIDATED, "False", INVALID_SPEC, message)
    failed = get_condition(st, FAILED)
    if st.phase not in TERMINAL or (failed is not None and failed.reason == INVALID_SPEC):
        p.fail(INVALID_SPEC, message)
    return _decide(p)


def checkpoint_conflict(
    job: LlamaTrainingJob, status: LlamaTrainingJobStatus, revision: str
) -> SpecError | None:
    """An edit of the model or the sequence length while the job's checkpoint directory holds
    checkpoints of the old one. The trainer would refuse them too, but only in the next
    attempt's pods, after a compile for the new model; here it fails before anything starts.
    Only an edit is judged: a spec whose pods already run (the same revision) is left alone even
    if its fingerprint reads differently now (say, after an operator upgrade). ``revision`` is
    the job's ``render.spec_revision``."""
    spec = job.spec
    if (
        status.checkpoint_fingerprint is None
        or status.revision == revision
        or spec.checkpoint.resume == "none"
        or spec.checkpoint.dir != status.checkpoint_dir
    ):
        return None
    fingerprint = spec.training_fingerprint()
    if fingerprint == status.checkpoint_fingerprint:
        return None
    newest = (
        f" (newest at step {status.last_checkpoint_step})"
        if status.last_checkpoint_step is not None
        else ""
    )
    return SpecError(
        "spec.model",
        f"this job's checkpoints in {spec.checkpoint.dir}{newest} hold another model "
        f"(fingerprint {status.checkpoint_fingerprint}; this spec {fingerprint}): "
        "spec.model or spec.data.seqLength changed, and no attempt could resume from them. "
        "Revert that change to continue, or set spec.checkpoint.dir to a new directory (or "
        "spec.checkpoint.resume to none) to train the new model from step 0",
    )


def _reopen(job: LlamaTrainingJob, old: LlamaTrainingJobStatus) -> bool:
    """A job failed by its spec starts over once the spec is edited (a new generation)."""
    failed = get_condition(old, FAILED)
    return (
        old.phase == FAILED
        and failed is not None
        and failed.reason in (INVALID_SPEC, TRAINER_ERROR, TRAINING_DIVERGED)
        and job.metadata.generation is not None
        and job.metadata.generation != old.observed_generation
    )


def reconcile(job: LlamaTrainingJob, observed: Observed, now: datetime) -> Decision:
    """Decide what to do for ``job`` (``job.status`` is the last written status, or None)."""
    old = job.status or LlamaTrainingJobStatus()
    if old.phase in TERMINAL and not _reopen(job, old):
        p = _Pass(job, observed, now, old, None)
        if job.metadata.generation is not None:
            p.st.observed_generation = job.metadata.generation
        return _decide(p)
    plan = make_plan(job.spec)
    problems = plan.problems()
    start = old
    if old.phase in TERMINAL:
        # Starting over: the fault history, the attempt count and what is known of the saved
        # checkpoints carry on.
        next_attempt = old.attempt + 1 if old.attempt else 0
        start = LlamaTrainingJobStatus(
            faults=old.faults,
            attempt=next_attempt,
            last_checkpoint_step=old.last_checkpoint_step,
            checkpoint_dir=old.checkpoint_dir,
            checkpoint_fingerprint=old.checkpoint_fingerprint,
        )
    p = _Pass(job, observed, now, start, plan)
    p.old = old  # events compare with what was written, also when starting over
    if conflict := checkpoint_conflict(job, old, p.revision):
        problems.append(conflict)
    if problems:
        return _invalid_pass(p, problems)
    p.run()
    return _decide(p)


def reconcile_invalid(
    job_name: str,
    errors: list[SpecError],
    status: LlamaTrainingJobStatus | None,
    *,
    observed: Observed,
    now: datetime,
    namespace: str = "default",
    generation: int | None = None,
) -> Decision:
    """For an object whose spec does not even parse (the shell caught the JobFileError):
    Failed/InvalidSpec with the field-by-field message, and no pod survives."""
    from .api import LlamaTrainingJobSpec, ObjectMeta

    # A stand-in job: only the name, namespace and generation matter on this path.
    placeholder = LlamaTrainingJob(
        api_version="llamajob.dev/v1alpha1",
        kind="LlamaTrainingJob",
        metadata=ObjectMeta(name=job_name, namespace=namespace, generation=generation),
        spec=LlamaTrainingJobSpec(),
        status=status,
    )
    old = status or LlamaTrainingJobStatus()
    p = _Pass(placeholder, observed, now, old, None)
    return _invalid_pass(p, errors or [SpecError("spec", "invalid")])
