"""`llamajob` command line: a thin dispatcher.

Each subcommand lives in the module that owns its work and exposes `main(argv) -> int`; the
module is imported only when its command runs, so `llamajob plan` never pays for torch and the
operator image (which has no torch) can still run every operator-side command.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

# name -> ("module:function", help)
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("llamajob.plan_cli:main", "check layout and memory, estimate time and cost"),
    "crd": ("llamajob.crd:main", "print the CustomResourceDefinition"),
    "render": ("llamajob.render_cli:main", "print the Kubernetes objects a job creates"),
    "run": ("llamajob.local_cli:main", "run a job on this machine (CPU, same lifecycle)"),
    "operator": ("llamajob.operator_cli:main", "run the Kubernetes operator"),
    "train": ("llamajob_trainer.cli:train_main", "one training rank (under torchrun)"),
    "compile": ("llamajob_trainer.cli:compile_main", "the compile step (under torchrun)"),
    "prepare-data": ("llamajob_trainer.cli:prepare_data_main", "tokenize text into a dataset"),
    "export-hf": ("llamajob_trainer.cli:export_hf_main", "export a checkpoint to HF safetensors"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: llamajob COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`llamajob COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from . import __version__

        print(f"llamajob {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"llamajob: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[args[0]]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"llamajob {args[0]}: needs a package that is not installed ({exc.name}). "
            "Install the trainer extra: pip install 'llamajob[trainer]' torch==2.13.0",
            file=sys.stderr,
        )
        return 79
    try:
        code = int(getattr(module, func_name)(args[1:]) or 0)
        # Flush here, not at interpreter exit, so that a closed pipe is caught below.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`llamajob render job.yaml | head`): stop quietly, as Unix tools
        # do. stdout is pointed at /dev/null so the exit-time flush cannot complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
