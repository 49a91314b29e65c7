"""The planner's searches take time independent of the spec's numbers.

The operator plans every job it sees, so a job with numHeads 999999937 or a micro-batch of
735134400 must be judged (and named) as fast as a normal one. The specs here are built past the
models' validation (``model_copy``), as a job admitted by an older CRD or built in code reaches
the planner: its answer must not depend on which maxima the schema has.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from llamajob import plan as planner
from llamajob.api import LlamaTrainingJobSpec
from llamajob.catalogue import GIB, INSTANCE_TYPES
from llamajob.plan import make_plan, suggest_fix, validate_layout
from pydantic import ValidationError

# Generous: each case takes milliseconds, where a search linear in the value takes 30 s or more;
# the bound only has to separate the two on a loaded machine.
BUDGET_SECONDS = 2.0
PRIME = 999_999_937  # the largest prime below 10**9
MERSENNE = 2**61 - 1  # a prime near the top of int64
HIGHLY_COMPOSITE = 735_134_400  # 1344 divisors

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    assert elapsed < BUDGET_SECONDS, f"took {elapsed:.2f} s"
    return result


def cpu_spec(**sections: dict[str, Any]) -> LlamaTrainingJobSpec:
    """A tiny CPU job (1 node x 2 ranks) with `sections` set field by field, unvalidated."""
    spec = LlamaTrainingJobSpec(cluster={"nodes": 1, "instance_type": "cpu",
                                         "processes_per_node": 2})
    for section, values in sections.items():
        part = getattr(spec, section).model_copy(update=values)
        spec = spec.model_copy(update={section: part})
    return spec


def messages(spec: LlamaTrainingJobSpec) -> dict[str, str]:
    return {e.field: e.message for e in timed(lambda: validate_layout(spec))}


def brute_divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divisors_by_sqrt(n: int) -> list[int]:
    """Every divisor by trial up to sqrt(n), for numbers too large to scan to n in a test."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small})


# --- the divisor search itself ------------------------------------------------------------------
def test_divisors_are_exact_for_every_small_number() -> None:
    for n in range(1, 2000):
        assert planner._divisors(n) == brute_divisors(n), n


@pytest.mark.parametrize("n", [65536, 65520, 131072, 720720, 999_983, 1_000_000])
def test_divisors_are_exact_for_layout_sized_numbers(n: int) -> None:
    assert planner._divisors(n) == brute_divisors(n)


def test_divisors_of_big_numbers_are_found_from_both_ends() -> None:
    assert timed(lambda: planner._divisors(PRIME)) == [1, PRIME]
    composite = timed(lambda: planner._divisors(HIGHLY_COMPOSITE))
    assert composite == divisors_by_sqrt(HIGHLY_COMPOSITE) and len(composite) == 1344
    assert timed(lambda: planner._divisors(MERSENNE)) == [1, MERSENNE]
    # Past 10**10 the search is bounded: the divisors up to 10**5 (2**16 here) and their
    # cofactors, every one a true divisor; 2**17 ... 2**45 lie between and are not searched.
    small = [2**k for k in range(17)]
    assert timed(lambda: planner._divisors(2**62)) == small + [2**62 // d for d in small[::-1]]


def test_divisor_between_the_trial_range_and_its_cofactors_is_found_near_the_value() -> None:
    # 3 * p * q: p and q are above the trial range and so is n / p, so only the search around
    # the value asked about can see p.
    q = 1_000_003
    n = 3 * PRIME * q
    assert PRIME not in planner._divisors(n)
    assert PRIME in timed(lambda: planner._divisors(n, near=PRIME - 37))


# --- validate_layout names the field, at once ---------------------------------------------------
def test_prime_head_count_near_a_billion() -> None:
    found = messages(cpu_spec(model={"num_heads": PRIME}))
    assert found["spec.model.hiddenSize"].endswith(f"numHeads {PRIME}; nearest valid: {PRIME}")
    assert found["spec.model.numKvHeads"].endswith("nearest valid: 1")


def test_kv_heads_nearest_divisor_of_a_huge_head_count() -> None:
    q = 1_000_003
    heads = 3 * PRIME * q
    found = messages(cpu_spec(model={"num_heads": heads, "hidden_size": heads,
                                     "num_kv_heads": PRIME - 37}))
    assert found["spec.model.numKvHeads"].endswith(f"nearest valid: {PRIME}")
    found = messages(cpu_spec(model={"num_heads": 2**62, "hidden_size": 2**62,
                                     "num_kv_heads": 3}))
    assert found["spec.model.numKvHeads"].endswith("nearest valid: 2")  # 2 and 4 tie: smaller
    found = messages(cpu_spec(model={"num_heads": MERSENNE, "hidden_size": MERSENNE,
                                     "num_kv_heads": 12345}))
    assert found["spec.model.numKvHeads"].endswith("nearest valid: 1")


def test_tensor_against_a_prime_head_count() -> None:
    spec = cpu_spec(model={"num_heads": PRIME, "hidden_size": PRIME, "num_kv_heads": PRIME},
                    parallelism={"tensor": 2})
    assert messages(spec)["spec.parallelism.tensor"].endswith("nearest valid: 1")


def test_pipeline_against_a_prime_layer_count() -> None:
    found = messages(cpu_spec(model={"num_layers": PRIME}, parallelism={"pipeline": 2}))
    assert found["spec.parallelism.pipeline"].endswith(f"the {PRIME} layers; nearest valid: 1")


def test_virtual_pipeline_against_a_huge_layer_count() -> None:
    spec = cpu_spec(model={"num_layers": 2 * PRIME},
                    parallelism={"pipeline": 2, "virtual_pipeline": 3,
                                 "pipeline_schedule": "Interleaved1F1B"})
    assert messages(spec)["spec.parallelism.virtualPipeline"].endswith("nearest valid: 1")
    spec = cpu_spec(model={"num_layers": 2 * MERSENNE},
                    parallelism={"pipeline": 2, "virtual_pipeline": 3,
                                 "pipeline_schedule": "Interleaved1F1B"})
    assert messages(spec)["spec.parallelism.virtualPipeline"].endswith("nearest valid: 1")


def test_huge_batch_sizes() -> None:
    spec = cpu_spec(batch={"micro_batch_size": 2**63 - 1, "global_batch_size": PRIME})
    message = messages(spec)["spec.batch.globalBatchSize"]
    assert message.endswith(f"nearest valid: {2 * (2**63 - 1)}")


# --- whole plans, memory verdict and suggestion included ---------------------------------------
def test_huge_layer_count_that_validates_plans_at_once_and_does_not_fit() -> None:
    spec = cpu_spec(model={"num_layers": 10**12})
    plan = timed(lambda: make_plan(spec))
    assert plan.errors == [] and not plan.fits
    (problem,) = plan.problems()
    assert problem.field == "spec.parallelism" and "GiB per core" in problem.message


def test_highly_composite_micro_batch_finds_the_largest_that_fits() -> None:
    gbs = 2 * HIGHLY_COMPOSITE  # two data-parallel ranks, no accumulation
    spec = cpu_spec(batch={"micro_batch_size": HIGHLY_COMPOSITE, "global_batch_size": gbs})
    plan = timed(lambda: make_plan(spec))
    assert plan.errors == [] and not plan.fits
    # The answer by exhaustion, without the planner's search: memory of every smaller divisor.
    limit = INSTANCE_TYPES["cpu"].memory_per_core_gib * GIB
    fitting = [
        d for d in divisors_by_sqrt(HIGHLY_COMPOSITE) if d < HIGHLY_COMPOSITE
        and planner.estimate_memory(cpu_spec(batch={"micro_batch_size": d,
                                                    "global_batch_size": gbs}), 2).total <= limit
    ]
    assert fitting, "the search space has an answer"
    best = max(fitting)
    try:  # the planner proposes only specs that pass the models
        LlamaTrainingJobSpec.model_validate(
            {**spec.model_dump(), "batch": {"micro_batch_size": best, "global_batch_size": gbs}}
        )
    except ValidationError:
        assert plan.suggestion is None
    else:
        assert plan.suggestion == f"microBatchSize: {HIGHLY_COMPOSITE} -> {best}"


# --- same answers as the exhaustive scan for ordinary specs -------------------------------------
def linear_micro_batch_fix(spec: LlamaTrainingJobSpec) -> str | None:
    """The micro-batch part of suggest_fix as a scan of every smaller divisor, largest first."""
    inst = INSTANCE_TYPES[spec.cluster.instance_type]
    world = spec.cluster.nodes * (spec.cluster.processes_per_node or inst.cores_per_node)
    mbs = spec.batch.micro_batch_size
    for d in sorted((d for d in brute_divisors(mbs) if d < mbs), reverse=True):
        trial = planner._with(spec, **{"batch.micro_batch_size": d})
        if validate_layout(trial):
            continue
        dp = world // (trial.parallelism.tensor * trial.parallelism.pipeline)
        if planner.estimate_memory(trial, dp).total <= inst.memory_per_core_gib * GIB:
            return f"microBatchSize: {mbs} -> {d}"
    return None


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe", "Interleaved1F1B"])
@pytest.mark.parametrize("mbs", [2, 6, 12, 24, 36, 60, 64, 120])
def test_micro_batch_bisection_matches_the_scan(schedule: str, mbs: int) -> None:
    # One rank per node, full recompute, a pipeline over both nodes: no tensor, recompute or
    # pipeline change is left, so the answer is the micro-batch one. The vocabulary makes the
    # logits, and so the memory, depend on it (from 2.6 to 39 GiB over these sizes).
    spec = LlamaTrainingJobSpec.model_validate({
        "model": {"preset": "tiny", "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 4,
                  "num_layers": 8, "vocab_size": 32000, "intermediate_size": 2816},
        "data": {"seq_length": 1024},
        "parallelism": {"pipeline": 2, "virtual_pipeline": 2 if schedule == "Interleaved1F1B"
                        else 1, "pipeline_schedule": schedule,
                        "activation_checkpointing": "full"},
        "batch": {"micro_batch_size": mbs, "global_batch_size": mbs * 4},
        "cluster": {"nodes": 2, "instance_type": "cpu", "processes_per_node": 1},
    })
    assert not validate_layout(spec)
    expected = linear_micro_batch_fix(spec)
    assert suggest_fix(spec) == expected
