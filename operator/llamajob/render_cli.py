"""`llamajob render FILE`: the Kubernetes objects the operator would create for a job, as YAML.

A preview for review and for `kubectl apply --dry-run=server`: the headless Service, the trainer
ConfigMap and the pods of one attempt. Without a uid (the job is not in a cluster yet) the
objects carry no ownerReferences; the operator adds them.

A job without `spec.cluster.image` gets the image of `--trainer-image` (as the operator gives
its own default); with neither, it is refused with the operator's InvalidSpec message.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from .images import parse_trainer_images, with_trainer_image
from .jobfile import JobFileError, load_job
from .plan import make_plan
from .render import ROLE_COMPILE, ROLE_TRAIN, render_all

EXIT_INVALID = 2


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded config.yaml) as literal blocks, readable as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamajob render",
        description="Print the Service, ConfigMap and pods the operator creates for a "
        "LlamaTrainingJob, as a YAML stream. Exit 2 (with the reasons on stderr) for a job the "
        "operator would reject.",
    )
    ap.add_argument("file", help="job YAML")
    ap.add_argument(
        "--role",
        choices=["all", ROLE_COMPILE, ROLE_TRAIN],
        default="all",
        help="which pods to print (default: compile when enabled, then train)",
    )
    ap.add_argument("--attempt", type=int, default=1, help="attempt number in pod names")
    ap.add_argument("--namespace", "-n", help="override metadata.namespace")
    ap.add_argument(
        "--trainer-image", dest="trainer_images", action="append", default=[],
        metavar="[FAMILY=]IMAGE",
        help="image for a job without spec.cluster.image, as the operator's --trainer-image "
        "(FAMILY: neuron, trn1 or cuda; without it, every family). Default: none, and such a job "
        "is refused",
    )
    return ap


def main(argv: list[str]) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.attempt < 1:
        ap.error(f"--attempt must be at least 1 (got {args.attempt})")
    try:
        images = parse_trainer_images(args.trainer_images)
    except ValueError as exc:
        ap.error(f"--trainer-image {exc}")
    try:
        job = load_job(args.file)
        job, missing = with_trainer_image(job, images)
        if missing is not None:
            # The planner's problems too, as the operator reports them together.
            raise JobFileError([*make_plan(job.spec).problems(), missing])
        if args.namespace:
            job.metadata.namespace = args.namespace
        roles = None if args.role == "all" else [args.role]
        docs = render_all(job, roles=roles, attempt=args.attempt)
    except JobFileError as exc:
        for e in exc.errors:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.write(yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
