"""`llamajob operator`: run the Kubernetes operator (kopf) with its metrics and liveness endpoints.

Credentials: the in-cluster service account when running in a pod, otherwise the kubeconfig
($KUBECONFIG or ~/.kube/config). Without either it stops at once with one line saying so.

Trainer images: no image is published, so jobs without `spec.cluster.image` get the one given
by `--trainer-image` for their trainer family (see `llamajob.images`), or fail with InvalidSpec.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from llamajob_trainer import protocol

DEFAULT_METRICS_PORT = 9090
DEFAULT_LIVENESS_PORT = 8080


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamajob operator",
        description="Run the LlamaTrainingJob operator against the current cluster.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", dest="namespaces", action="append", default=[], metavar="NS",
        help="watch only this namespace (repeatable; globs like 'team-*' work)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true",
        help="watch every namespace (the default)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--peering", metavar="NAME",
        help="coordinate replicas through this kopf peering object (one active at a time)",
    )
    mode.add_argument(
        "--standalone", action="store_true",
        help="no peering: this is the only operator (the default)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=DEFAULT_METRICS_PORT, metavar="PORT",
        help=f"serve the operator's Prometheus metrics on this port, 0 to disable "
        f"(default {DEFAULT_METRICS_PORT})",
    )
    p.add_argument(
        "--liveness-port", type=int, default=DEFAULT_LIVENESS_PORT, metavar="PORT",
        help=f"kopf's liveness endpoint http://0.0.0.0:PORT/healthz, 0 to disable "
        f"(default {DEFAULT_LIVENESS_PORT})",
    )
    p.add_argument(
        "--progress-interval", type=float, default=20.0, metavar="SECONDS",
        help="how often to read rank 0's training metrics while a job trains (default 20)",
    )
    p.add_argument(
        "--trainer-metrics-port", type=int, default=protocol.DEFAULT_METRICS_PORT,
        metavar="PORT",
        help=f"port of the trainer's metrics endpoint (default {protocol.DEFAULT_METRICS_PORT})",
    )
    p.add_argument(
        "--trainer-image", dest="trainer_images", action="append", default=[],
        metavar="[FAMILY=]IMAGE",
        help="trainer image for jobs that set no spec.cluster.image (repeatable). FAMILY is a "
        "trainer target of the Dockerfile: neuron (trn2/trn3, torch backend), trn1 (the nxd "
        "backend) or cuda (GPU and cpu types); without FAMILY= the image serves every family "
        "not given on its own. Default: none, and such jobs fail with InvalidSpec",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def trainer_images(values: Iterable[str]) -> dict[str, str]:
    """The parsed `--trainer-image` values: {family: image}. Raises ValueError."""
    from .images import parse_trainer_images

    return parse_trainer_images(values)


SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
EXIT_NO_CREDENTIALS = 1


def credentials_problem() -> str | None:
    """Why the operator could not log in to any cluster, in one line; None when it can."""
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SERVICE_ACCOUNT_TOKEN.is_file()
    if not in_cluster:
        env = os.environ.get("KUBECONFIG")
        if env:
            paths = [p for p in env.split(os.pathsep) if p]
            missing = [p for p in paths if not Path(p).expanduser().is_file()]
            if missing or not paths:
                return ("no Kubernetes credentials: not in a cluster, and KUBECONFIG names "
                        f"no file that exists ({', '.join(missing) or repr(env)}; "
                        "set KUBECONFIG to your kubeconfig)")
        else:
            default = Path("~/.kube/config").expanduser()
            if not default.is_file():
                return ("no Kubernetes credentials: not in a cluster and no kubeconfig at "
                        f"{default} (set KUBECONFIG)")
    import kopf

    from .handlers import _login_now

    try:
        info = _login_now(kopf.OperatorSettings())
    except Exception as exc:  # a kubeconfig kopf cannot read: say which and why, no traceback
        return f"cannot use the Kubernetes credentials: {type(exc).__name__}: {exc}"
    if info is None:
        return ("no usable Kubernetes credentials: the kubeconfig has no current context with a "
                "server (check `kubectl config current-context`)")
    return None


def _check_port(parser: argparse.ArgumentParser, flag: str, value: int) -> None:
    if not 0 <= value <= 65535:
        parser.error(f"{flag} must be a port number between 1 and 65535, or 0 to disable")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_port(parser, "--metrics-port", args.metrics_port)
    _check_port(parser, "--liveness-port", args.liveness_port)
    _check_port(parser, "--trainer-metrics-port", args.trainer_metrics_port)
    if args.progress_interval <= 0:
        parser.error("--progress-interval must be positive")
    try:
        images = trainer_images(args.trainer_images)
    except ValueError as exc:
        parser.error(f"--trainer-image {exc}")
    if problem := credentials_problem():
        print(f"llamajob operator: {problem}", file=sys.stderr)
        return EXIT_NO_CREDENTIALS

    import kopf
    from prometheus_client import start_http_server

    from . import handlers
    from .metrics import REGISTRY

    kopf.configure(verbose=args.verbose, log_prefix=True)
    logging.getLogger("llamajob").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        # kopf reports every handled pod event at INFO; the operator's own log says what
        # matters (transitions, faults, restarts) at INFO.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    handlers.CONFIG = handlers.OperatorConfig(
        progress_interval=args.progress_interval,
        trainer_metrics_port=args.trainer_metrics_port,
        trainer_images=images,
    )
    if args.metrics_port:
        try:
            start_http_server(args.metrics_port, registry=REGISTRY)
        except OSError as exc:
            print(f"llamajob operator: cannot serve metrics on port {args.metrics_port}: "
                  f"{exc.strerror}", file=sys.stderr)
            return 2
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=liveness,
    )
    return 0
