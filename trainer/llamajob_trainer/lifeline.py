"""Tie a local run's processes to their parents' lives (Linux).

`llamajob run` starts torchrun, and torchrun starts the ranks, each in a session of its own so
that a whole tree can be signalled at once. That also detaches them: if `llamajob run` is
SIGKILLed, or its process group is, torchrun and the ranks keep training, and a rerun puts a
second gang on the same checkpoint directory. So each link gets a parent-death signal
(``PR_SET_PDEATHSIG``), which the kernel sends whatever way the parent died:

- torchrun gets SIGTERM, which it forwards to its ranks: they save their step and exit, as on
  Ctrl-C. torchrun is started through this module (``python -m llamajob_trainer.lifeline
  ARGV...``), which arms the signal and then execs ARGV, keeping its pid.
- each rank gets SIGKILL when torchrun dies, as the processes of a pod die with its container.
  ``llamajob train`` and ``compile`` arm it first thing when :data:`PARENT_ENV` is set, which
  only the local runner does; in a pod the variable is absent and this module does nothing.

A parent-death signal fires when the parent *thread* that forked the process ends: both the
local runner and torchrun start their children from their main thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# The pid the process must not outlive; the one that sets it is the process's parent.
PARENT_ENV = "LLAMAJOB_LIFELINE_PARENT"

_PR_SET_PDEATHSIG = 1


def die_with(parent: int, sig: signal.Signals) -> None:
    """Have the kernel send `sig` to this process when its parent, pid `parent`, dies."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    # The parent may have died before the prctl: then this process was already handed to
    # another parent and the kernel will never send the signal.
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def die_with_launcher() -> None:
    """For a rank started by the local runner's torchrun: die (SIGKILL) when torchrun dies."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        die_with(int(parent), signal.SIGKILL)


def main(argv: list[str]) -> None:
    """Exec `argv` as a child that gets SIGTERM when the process in :data:`PARENT_ENV` dies,
    and whose own children can in turn tie themselves to it."""
    if not argv:
        print("usage: python -m llamajob_trainer.lifeline PROGRAM [ARGS...]", file=sys.stderr)
        sys.exit(2)
    parent = os.environ.get(PARENT_ENV)
    if parent:
        die_with(int(parent), signal.SIGTERM)
    os.environ[PARENT_ENV] = str(os.getpid())  # exec keeps the pid: the children's parent
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
