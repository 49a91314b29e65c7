"""The XLA tier: the trn1 code paths that need no NxD, on the real torch-xla 2.9 and torch 2.9
(the trn1 image's), through torch-xla's CPU client.

Run by ``make test-xla`` (and at the end of ``make test``) in its own venv, ``.venv-xla``. It
never skips: torch_xla is imported here, unconditionally, so a venv without it fails at
collection instead of passing with nothing run.
"""

from __future__ import annotations

import sys

import nxd_standins
import pytest
import torch
import torch_xla  # a venv without it fails here, at collection (see above)
import torch_xla.runtime as xr


@pytest.fixture(scope="session")
def device() -> torch.device:
    # The graph counts the tests assert are the CPU client's; PJRT_DEVICE names it (torch-xla
    # also falls back to it when it finds no TPU or Neuron library).
    assert xr.device_type() == "CPU", f"run with PJRT_DEVICE=CPU, not {xr.device_type()}"
    dev = torch_xla.device()
    assert dev.type == "xla"
    return dev


@pytest.fixture
def nxd(monkeypatch: pytest.MonkeyPatch) -> None:
    """NxD's stand-ins (``nxd_standins``) in sys.modules for one test."""
    for name, mod in nxd_standins.modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
