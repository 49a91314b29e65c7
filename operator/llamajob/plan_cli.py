"""`llamajob plan FILE`: the planner's verdict, for people (default) or machines (-o json)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from llamajob_trainer.config import MAX_TOKENS

from .jobfile import JobFileError, load_job
from .plan import DEFAULT_MFU_BY_FAMILY, Plan, make_plan

EXIT_INVALID = 2


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 2 * 365 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / (365.25 * 86400):.1f} years"


def _si(value: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} "


def render_text(name: str, plan: Plan) -> str:
    p = plan
    arch = p.spec.model.architecture()
    lines = [
        f"Job {name}: {p.spec.model.preset} ({_si(p.num_params)}parameters) on "
        f"{p.nodes} x {p.instance.name}, backend {p.backend}"
        + (f" on {p.device}" if p.backend == "torch" else ""),
        f"  layout     world {p.world_size} = {p.nodes} pod(s) x {p.processes_per_node} ranks; "
        f"tensor {p.tensor} x pipeline {p.pipeline} x data {p.data_parallel}",
        f"  batch      global {p.spec.batch.global_batch_size} x seq {p.spec.data.seq_length}; "
        f"micro {p.spec.batch.micro_batch_size}, grad accumulation {p.grad_accum}",
    ]
    if p.memory is not None:
        m = p.memory.gib()
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines += [
            f"  memory     {m['total']:.2f} GiB of {p.core_memory_gib:.0f} GiB per "
            f"{_DEVICE_WORD.get(p.instance.family, 'rank')}: "
            f"{verdict} (margin {p.margin_gib:+.2f} GiB)",
            f"             weights {m['weights']:.2f}, grads {m['gradients']:.2f}, "
            f"optimizer {m['optimizer']:.2f}, gather {m['gather_buffer']:.2f}, "
            f"activations {m['activations']:.2f}, logits {m['logits']:.2f}, "
            f"reserve {m['reserve']:.2f}",
        ]
        if m["accumulation"] or m["step_buffer"]:
            # The torch backend's two extra terms; the step buffer peaks after backward, so it
            # counts only where it exceeds what backward holds.
            lines.append(
                f"             accumulated grads {m['accumulation']:.2f}, "
                f"step buffer {m['step_buffer']:.2f} (after backward, in place of "
                "activations and logits)"
            )
        if not p.fits:
            lines.append(
                f"  fix        {p.suggestion or 'no single layout change fits; add nodes'}"
            )
        rate = (
            f"assumed MFU {p.assumed_mfu:.0%}"
            if p.assumed_mfu is not None
            else "measured throughput"
        )
        lines += [
            f"  compute    {_si(p.flops_per_token)}FLOP/token (6N + 12*L*h*s, L={arch.num_layers}),"
            f" {_si(p.tokens_per_step)}tokens/step, {_si(p.flops_per_step)}FLOP/step",
            f"  speed      {p.tflops_per_node:,.3g} TFLOPS per node ({rate}): "
            f"{_duration(p.step_seconds)} per step",
            f"  total      {p.total_steps:,} steps, {_si(p.total_tokens)}tokens: "
            f"{_duration(p.total_seconds)}, "
            + (f"${p.total_cost_usd:,.0f} at ${p.price_per_hour:.2f}/node-hour"
               if p.price_per_hour else
               f"cost unknown: the catalogue has no price for {p.instance.name}; pass --price"),
        ]
    return "\n".join(lines)


_DEVICE_WORD = {"trn1": "NeuronCore", "trn2": "NeuronCore", "trn3": "NeuronCore", "gpu": "GPU"}


class _Parser(argparse.ArgumentParser):
    """One line per bad flag, like every other bad input (argparse adds the usage text)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message} (see --help)\n")


def _number(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high]. float() takes 'inf' and 'nan', and
    either would only surface as a traceback or a nonsense estimate."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(
                f"must be a number from {low:g} to {high:g} (got {text!r})"
            )
        return value

    return parse


def _family_defaults() -> str:
    return ", ".join(f"{family} {mfu:g}" for family, mfu in DEFAULT_MFU_BY_FAMILY.items())


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="llamajob plan",
        description="Validate a LlamaTrainingJob's layout, check that it fits in device memory, "
        "and estimate step time, total time and cost. Exit 0 when valid and fits, 2 otherwise.",
    )
    ap.add_argument("file", help="job YAML")
    ap.add_argument("-o", "--output", choices=["text", "json"], default="text")
    rate = ap.add_mutually_exclusive_group()
    # The ranges keep the estimates meaningful: below them a step takes longer than the age of
    # the universe, above them no hardware or budget exists.
    rate.add_argument(
        "--mfu",
        type=_number(0.001, 1),
        help="assumed model FLOPs utilisation, a fraction of the instance peak "
        f"(default by instance family: {_family_defaults()})",
    )
    rate.add_argument(
        "--tflops", type=_number(1e-6, 1e6), help="measured TFLOPS per node (overrides --mfu)"
    )
    ap.add_argument(
        "--price", type=_number(1e-6, 1e6), help="price per node-hour (default: catalogue)"
    )
    ap.add_argument(
        "--tokens",
        type=_number(1, MAX_TOKENS),
        help="plan for this many tokens instead of maxSteps",
    )
    return ap


def main(argv: list[str]) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        job = load_job(args.file)
    except JobFileError as exc:
        for e in exc.errors:
            print(f"error: {e}", file=sys.stderr)
        if args.output == "json":
            print(json.dumps({"fits": False, "errors": [e.to_dict() for e in exc.errors]}))
        return EXIT_INVALID
    plan = make_plan(
        job.spec,
        mfu=args.mfu,
        tflops_per_node=args.tflops,
        price_per_hour=args.price,
        tokens=int(args.tokens) if args.tokens is not None else None,
    )
    if args.output == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(render_text(job.metadata.name, plan))
    if not plan.valid:
        for problem in plan.problems():
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID
    return 0
