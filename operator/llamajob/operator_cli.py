"""`llamajob operator`: run the Kubernetes operator (kopf) with its metrics and liveness endpoints.

Credentials: the in-cluster service account when running in a pod, otherwise the kubeconfig
($KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import argparse
import logging
import sys

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
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


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
