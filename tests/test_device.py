"""Device resolution of the torch backend (``llamajob_trainer.parallel.device``).

What runs here: the table (device -> process group, autocast, compile backend, RNG source), the
resolution of ``auto`` on this machine, and the errors for a requested device that is missing,
also through the real ``llamajob train`` command. This machine has no GPU and no Trainium, so no
cuda or neuron training runs here.

The neuron resolution (import, registration check, index choice, ``set_device``, RNG capture and
restore, memory figure) is exercised against a stand-in ``torch_neuronx`` that registers a
``neuron`` PrivateUse1 device module implementing PyTorch's device-module contract
(``torch.utils.rename_privateuse1_backend``). It runs the trainer's real code, in a subprocess
because that registration cannot be undone; it shows that the trainer calls the device module
as the contract says, not that TorchNeuron behaves as documented.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from llamajob_trainer import protocol
from llamajob_trainer.errors import ConfigError, DependencyError
from llamajob_trainer.parallel import device as devices
from trainer_helpers import prepare_pydoc, tiny_config, trainer_env, write_config

ACCELERATOR = torch.accelerator.current_accelerator(check_available=True)
CUDA_HERE = torch.cuda.is_available()
NEURON_INSTALLED = importlib.util.find_spec("torch_neuronx") is not None


# --- the table (pure) --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device", "process_group", "autocast", "compile_backend", "rng_module", "fused", "onednn"),
    [
        ("cpu", "gloo", "cpu", "inductor", None, True, True),
        ("cuda", "nccl", "cuda", "inductor", "torch.cuda", True, False),
        ("neuron", "neuron", "neuron", "neuron", "torch.neuron", False, False),
    ],
)
def test_what_each_device_implies(
    device: str, process_group: str, autocast: str, compile_backend: str,
    rng_module: str | None, fused: bool, onednn: bool,
) -> None:
    kind = devices.KINDS[device]
    assert kind.type == device
    assert kind.process_group == process_group
    assert kind.autocast == autocast
    assert kind.compile_backend == compile_backend
    assert kind.rng_module == rng_module
    assert kind.fused_adamw is fused
    assert kind.onednn_linear is onednn  # oneDNN is a CPU kernel
    assert kind.measures_peak_flops is (device == "cpu")
    assert kind.indexed is (device != "cpu")
    assert kind.ddp_device_ids is (device == "cuda")
    # Inductor's cache follows compile.cacheDir; TorchNeuron keeps its own.
    assert (kind.compile_cache_env == "TORCHINDUCTOR_CACHE_DIR") is (compile_backend == "inductor")


def test_the_table_covers_every_device_the_job_spec_accepts() -> None:
    from llamajob_trainer.config import TrainingSpec

    accepted = set(TrainingSpec.model_fields["device"].annotation.__args__)  # type: ignore[union-attr]
    assert accepted == set(devices.REQUESTS)
    assert accepted - {"auto"} == set(devices.KINDS)
    with pytest.raises(ConfigError, match="use one of auto, cpu, cuda, neuron"):
        devices.requested_type("tpu")


# --- auto and cpu on this machine ------------------------------------------------------------
def test_auto_is_the_available_accelerator_else_cpu() -> None:
    expected = ACCELERATOR.type if ACCELERATOR is not None else "cpu"
    assert devices.requested_type("auto") == expected
    if ACCELERATOR is None:
        assert devices.resolve("auto") is devices.KINDS["cpu"]


@pytest.mark.skipif(
    torch.version.cuda is None or CUDA_HERE, reason="needs a CUDA build of torch without a GPU"
)
def test_auto_ignores_a_cuda_build_that_finds_no_gpu() -> None:
    """A CUDA wheel names cuda as its accelerator even with no GPU: auto must not pick it."""
    compiled_in = torch.accelerator.current_accelerator()
    assert compiled_in is not None and compiled_in.type == "cuda"
    assert devices.requested_type("auto") == "cpu"


def test_cpu_goes_through_the_same_resolution_and_placement() -> None:
    from llamajob_trainer.checkpoint import capture_rng, restore_rng
    from llamajob_trainer.parallel import init_distributed, shutdown_distributed

    env = init_distributed("torch", "cpu")
    try:
        assert env.device == torch.device("cpu") and env.backend == "gloo"
        assert devices.current() == torch.device("cpu")
        # CPU only: no accelerator generator, no device memory figure.
        assert devices.rng_device() is None
        assert devices.max_memory_allocated(env.device) is None
        state = capture_rng()
        assert set(state) == {"torch", "python", "numpy"}
        expected = torch.rand(4)
        restore_rng(state)
        assert torch.equal(torch.rand(4), expected)
    finally:
        shutdown_distributed()


# --- missing devices ----------------------------------------------------------------------------
@pytest.mark.skipif(CUDA_HERE, reason="a GPU is visible here")
def test_cuda_without_a_gpu_is_a_dependency_error() -> None:
    with pytest.raises(DependencyError) as info:
        devices.resolve("cuda")
    assert info.value.exit_code == protocol.EXIT_DEPENDENCY == 79
    message = str(info.value)
    assert message.startswith("device: cuda needs a CUDA build of torch and an NVIDIA driver")
    assert torch.__version__ in message and "device: cpu" in message


@pytest.mark.skipif(NEURON_INSTALLED, reason="torch_neuronx is installed here")
def test_neuron_without_torch_neuronx_is_a_dependency_error() -> None:
    with pytest.raises(DependencyError) as info:
        devices.resolve("neuron")
    assert info.value.exit_code == protocol.EXIT_DEPENDENCY
    message = str(info.value)
    assert message.startswith("device: neuron needs TorchNeuron, the torch-neuronx package")
    assert "torch_neuronx is not importable here" in message
    assert "AWS Neuron repository" in message and devices.NEURON_REPOSITORY in message
    assert "backend: nxd" in message  # what trn1 needs instead


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_pydoc(tmp_path_factory.mktemp("data") / "pydoc")


@pytest.mark.parametrize(
    ("device", "needles"),
    [
        pytest.param(
            "cuda", ["device: cuda", "CUDA build of torch", "NVIDIA driver"],
            marks=pytest.mark.skipif(CUDA_HERE, reason="a GPU is visible here"),
        ),
        pytest.param(
            "neuron", ["device: neuron", "torch-neuronx", "AWS Neuron repository"],
            marks=pytest.mark.skipif(NEURON_INSTALLED, reason="torch_neuronx is installed here"),
        ),
    ],
)
def test_llamajob_train_reports_a_missing_device_in_one_line(
    tmp_path: Path, data: Path, llamajob_bin: str, device: str, needles: list[str]
) -> None:
    """The exit code and termination message the operator reads: permanent, no traceback."""
    cfg = write_config(tmp_path / "job.yaml", tiny_config(data, tmp_path / "ckpt", device=device))
    result = subprocess.run(
        [llamajob_bin, "train", "--config", str(cfg)],
        env=trainer_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == protocol.EXIT_DEPENDENCY, result.stderr[-3000:]
    err = result.stderr
    assert err.startswith("llamajob train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    message = json.loads((tmp_path / "termination.json").read_text())
    assert message["permanent"] is True and message["exitCode"] == protocol.EXIT_DEPENDENCY
    assert message["reason"] == "MissingDependency"
    assert not (tmp_path / "ckpt").exists()  # nothing started


# --- neuron against a stand-in device module --------------------------------------------------
FAKE_TORCH_NEURONX = '''
"""Stand-in for torch_neuronx: a "neuron" PrivateUse1 device module, no kernels."""
import os
import types

import torch

MODE = os.environ.get("FAKE_NEURON_MODE", "ok")
with open(os.environ["FAKE_NEURON_IMPORTS"], "a") as log:
    log.write("imported\\n")

calls = []
if MODE != "xla":  # the XLA-based torch-neuronx of trn1 registers no "neuron" device
    torch.utils.rename_privateuse1_backend("neuron")
    module = types.ModuleType("neuron")
    count = int(os.environ.get("FAKE_NEURON_DEVICES", "4"))
    states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
    current = [0]

    def _index(device=None):
        if device is None:
            return current[0]
        if isinstance(device, int):
            return device
        device = torch.device(device)
        assert device.type == "neuron", device
        return current[0] if device.index is None else device.index

    module.is_available = lambda: MODE != "no-cores"
    module.device_count = lambda: count
    module.current_device = lambda: current[0]

    def set_device(device):
        calls.append(["set_device", str(device)])
        current[0] = _index(device)

    def get_rng_state(device="neuron"):
        calls.append(["get_rng_state", _index(device)])
        return states[_index(device)].clone()

    def set_rng_state(state, device="neuron"):
        calls.append(["set_rng_state", _index(device), state.tolist()])
        states[_index(device)] = state.clone()

    def synchronize(device=None):
        calls.append(["synchronize"])

    def max_memory_allocated(device=None):
        calls.append(["max_memory_allocated", _index(device)])
        return 3 * 2**30

    module.set_device = set_device
    module.get_rng_state = get_rng_state
    module.set_rng_state = set_rng_state
    module.synchronize = synchronize
    module.max_memory_allocated = max_memory_allocated
    torch._register_device_module("neuron", module)
'''

DRIVER = '''
import json, sys
from llamajob_trainer.errors import TrainerUserError
from llamajob_trainer.parallel import device as devices

out = {}
try:
    kind = devices.resolve(sys.argv[1])
except TrainerUserError as exc:
    print(json.dumps({"error": type(exc).__name__, "exit_code": exc.exit_code,
                      "message": str(exc)}))
    sys.exit(0)
out["kind"] = kind.type
if kind.type == "neuron":
    import torch_neuronx
    from llamajob_trainer.checkpoint import capture_rng, restore_rng

    try:
        placed = devices.place(kind, int(sys.argv[2]))
    except TrainerUserError as exc:
        out["place_error"] = str(exc)
    else:
        out["device"] = str(placed)
        state = capture_rng()
        out["captured"] = {"type": state["device"]["type"],
                           "state": state["device"]["state"].tolist()}
        state["device"]["state"] = state["device"]["state"] + 100
        restore_rng(state)
        out["memory"] = devices.max_memory_allocated(placed)
        out["calls"] = torch_neuronx.calls
print(json.dumps(out))
'''


def run_with_fake_neuron(
    tmp_path: Path, requested: str, local_rank: int = 0, **env: str
) -> tuple[dict[str, Any], bool]:
    """Run DRIVER with the stand-in importable; returns its output and whether the stand-in
    was imported."""
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "torch_neuronx.py").write_text(textwrap.dedent(FAKE_TORCH_NEURONX))
    imports = tmp_path / "imports.log"
    imports.write_text("")
    run_env = dict(os.environ, FAKE_NEURON_IMPORTS=str(imports), **env)
    run_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(fake), os.environ.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, requested, str(local_rank)],
        env=run_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), bool(imports.read_text())


@pytest.mark.skipif(NEURON_INSTALLED, reason="the real torch_neuronx would shadow the stand-in")
def test_neuron_resolution_places_rng_and_memory_on_the_ranks_core(tmp_path: Path) -> None:
    out, imported = run_with_fake_neuron(tmp_path, "neuron", local_rank=2)
    assert imported
    assert out["kind"] == "neuron" and out["device"] == "neuron:2"
    calls = out["calls"]
    assert calls[0] == ["set_device", "neuron:2"]
    # The checkpoint captures this rank's core's generator and restores it there.
    assert out["captured"] == {"type": "neuron", "state": [2] * 16}
    assert ["set_rng_state", 2, [102] * 16] in calls
    # Memory is read after a synchronize, on the current (this rank's) core.
    assert out["memory"] == 3 * 2**30
    assert calls[-2:] == [["synchronize"], ["max_memory_allocated", 2]]


@pytest.mark.skipif(NEURON_INSTALLED, reason="the real torch_neuronx would shadow the stand-in")
def test_neuron_placement_with_one_core_per_process_and_too_few_cores(tmp_path: Path) -> None:
    one, _ = run_with_fake_neuron(tmp_path, "neuron", local_rank=3, FAKE_NEURON_DEVICES="1")
    assert one["device"] == "neuron:0"  # the launcher gave this process its own core
    few, _ = run_with_fake_neuron(tmp_path, "neuron", local_rank=5, FAKE_NEURON_DEVICES="4")
    assert few["place_error"].startswith("local rank 5 but this process sees 4 neuron devices")


@pytest.mark.skipif(NEURON_INSTALLED, reason="the real torch_neuronx would shadow the stand-in")
@pytest.mark.parametrize(
    ("mode", "needle"),
    [
        ("xla", "torch_neuronx imported but registered no 'neuron' device"),
        ("no-cores", "no NeuronCore is visible to this process"),
    ],
)
def test_neuron_installed_but_unusable_is_a_dependency_error(
    tmp_path: Path, mode: str, needle: str
) -> None:
    out, _ = run_with_fake_neuron(tmp_path, "neuron", FAKE_NEURON_MODE=mode)
    assert out["error"] == "DependencyError" and out["exit_code"] == protocol.EXIT_DEPENDENCY
    assert needle in out["message"] and out["message"].startswith("device: neuron")


@pytest.mark.skipif(NEURON_INSTALLED, reason="the real torch_neuronx would shadow the stand-in")
@pytest.mark.parametrize("requested", ["cpu", "auto"])
def test_torch_neuronx_is_imported_only_for_device_neuron(tmp_path: Path, requested: str) -> None:
    out, imported = run_with_fake_neuron(tmp_path, requested)
    auto = ACCELERATOR.type if ACCELERATOR is not None else "cpu"
    assert out["kind"] == ("cpu" if requested == "cpu" else auto)
    assert not imported
