"""The device the torch backend trains on, and everything that follows from it.

The job's ``device`` (``auto``, ``cpu``, ``cuda`` or ``neuron``) is resolved once per process by
``init_distributed``: ``resolve`` checks that the device exists here and returns its
``DeviceKind``; ``place`` picks this rank's device index, makes it the process's current device
and records it. Everything device-specific that the torch backend, the checkpoint's RNG capture
and the training loop need comes from this module: the process-group backend, the autocast
device type, the torch.compile backend and its cache variable, whether the fused AdamW kernel and
the oneDNN CPU linear apply, where the device RNG state lives, and the device memory figures.

``auto`` is ``torch.accelerator.current_accelerator(check_available=True)``, else ``cpu``. A
CUDA build of torch on a machine without a GPU therefore trains on cpu under ``auto`` and fails
with ``DependencyError`` under ``cuda``.

``torch_neuronx`` is imported only when the device is ``neuron``. TorchNeuron documents itself as
a standard PrivateUse1 backend whose ``torch.neuron`` module "plays the role that torch.cuda
plays", so the neuron entry below uses the same device-module calls as cuda
(``torch.get_device_module``), which is also the contract PyTorch states for PrivateUse1 device
modules (``torch.utils.rename_privateuse1_backend``: ``device_count``, ``get_rng_state``,
``set_rng_state``, ``is_available``, ``current_device``). Sources, all AWS Neuron documentation
for TorchNeuron (torch-neuronx 2.13.3 / 2.14.3, Neuron 2.33, trn2/trn3):

- "What is TorchNeuron?" https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/about-pytorch-neuron.html
  and "Native PyTorch for AWS Trainium" https://awsdocs-neuron.readthedocs-hosted.com/en/latest/archive/frameworks/torch/pytorch-native-overview.html:
  device ``neuron``; ``torch.autocast(device_type="neuron")``; ``torch.compile(backend="neuron")``
  without Inductor; DDP, FSDP2, DTensor/TP supported.
- "How to use torch.distributed on Neuron" https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/guides/torch-distributed.html:
  ``import torch_neuronx`` registers the device and the distributed backend;
  ``dist.init_process_group(backend="neuron")``.
- "torch.neuron and torch.accelerator reference" https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/reference/api/torch-neuron-module.html:
  ``torch.neuron`` is the device module (``is_available``, ``device_count``, random, memory,
  ``synchronize``); torch_neuronx is autoloaded with torch unless
  ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``, and leaves the registration to another PrivateUse1 backend
  imported first (then ``torch.neuron`` does not exist).
- "Random number generation" https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/reference/random-number-generation.html:
  one default generator per Neuron device (16 bytes: seed and offset).
- "How to profile memory usage in torch-neuronx" https://awsdocs-neuron.readthedocs-hosted.com/en/latest/torch/guides/memory-profiling-guide.html:
  call ``torch.neuron.synchronize()`` before reading any memory statistic.

None of the cuda or neuron paths has run on this project's machines (no GPU, no Trainium): the
tests cover the table, the missing-device errors, and the neuron resolution against a stand-in
device module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, DependencyError

# The values of TrainingSpec.device, "auto" included.
REQUESTS = ("auto", "cpu", "cuda", "neuron")

NEURON_PACKAGE = "torch_neuronx"
NEURON_REPOSITORY = "https://pip.repos.neuron.amazonaws.com"


@dataclass(frozen=True)
class DeviceKind:
    """What follows from a device type alone (no hardware is touched to build this)."""

    type: str  # torch.device type
    process_group: str  # torch.distributed.init_process_group backend
    autocast: str  # torch.autocast device_type
    compile_backend: str  # torch.compile backend for the transformer blocks
    # Environment variable that points the compiler's persistent cache at compile.cacheDir, so
    # the compile step warms it for the training pods; None: the compiler keeps its own default.
    compile_cache_env: str | None
    # torch.optim.AdamW(fused=True): one kernel over all parameters. Only where torch has the
    # kernel for the device and the backend is known to run it.
    fused_adamw: bool
    # The model's fp32 linears on oneDNN (cpu_linear): a CPU kernel, nowhere else.
    onednn_linear: bool
    # DistributedDataParallel(device_ids=[index]): what DDP documents for a single-GPU module.
    # Elsewhere None, which DDP also accepts for a single-device module.
    ddp_device_ids: bool
    # The MFU peak is timed in-process (a CPU matmul) only on CPU; accelerators take
    # peakTflopsPerCore from the instance catalogue.
    measures_peak_flops: bool
    # What provides the device, named in the error when it is missing.
    provider: str

    @property
    def indexed(self) -> bool:
        """One device per local rank (accelerators); the CPU is shared by every rank."""
        return self.type != "cpu"

    @property
    def rng_module(self) -> str | None:
        """Where this device's RNG state lives besides the CPU's (always captured), or None."""
        return None if self.type == "cpu" else f"torch.{self.type}"


KINDS: dict[str, DeviceKind] = {
    "cpu": DeviceKind(
        type="cpu",
        process_group="gloo",
        autocast="cpu",
        compile_backend="inductor",
        compile_cache_env="TORCHINDUCTOR_CACHE_DIR",
        fused_adamw=True,
        onednn_linear=True,
        ddp_device_ids=False,
        measures_peak_flops=True,
        provider="torch",
    ),
    "cuda": DeviceKind(
        type="cuda",
        process_group="nccl",
        autocast="cuda",
        compile_backend="inductor",
        compile_cache_env="TORCHINDUCTOR_CACHE_DIR",
        fused_adamw=True,
        onednn_linear=False,
        ddp_device_ids=True,
        measures_peak_flops=False,
        provider="a CUDA build of torch and an NVIDIA driver with a visible GPU",
    ),
    "neuron": DeviceKind(
        type="neuron",
        process_group="neuron",
        autocast="neuron",
        compile_backend="neuron",
        # TorchNeuron keeps compiled NEFFs in its own persistent cache; the operator's pods
        # point it (TORCH_NEURONX_NEFF_CACHE_DIR) at compile.cacheDir/neff on the shared volume,
        # so nothing is set from here. Whether that cache is safe with every rank writing on a
        # shared file system is not documented (docs/trainium.md).
        compile_cache_env=None,
        # torch would accept fused=True for any PrivateUse1 device, but whether TorchNeuron runs
        # the fused AdamW kernel natively is not confirmed by its documentation: keep torch's
        # default implementation there.
        fused_adamw=False,
        onednn_linear=False,
        ddp_device_ids=False,
        measures_peak_flops=False,
        provider=f"TorchNeuron, the torch-neuronx package ({NEURON_PACKAGE})",
    ),
}


def requested_type(requested: str) -> str:
    """The device type a request names: ``auto`` is the accelerator PyTorch finds, else cpu."""
    if requested not in REQUESTS:
        raise ConfigError(f"device {requested!r}: use one of {', '.join(REQUESTS)}")
    if requested != "auto":
        return requested
    # check_available: a CUDA build of torch reports cuda as its accelerator even with no GPU.
    found = torch.accelerator.current_accelerator(check_available=True)
    if found is None:
        return "cpu"
    if found.type not in KINDS:
        raise ConfigError(
            f"device auto found the accelerator {found.type!r}, which the torch backend does not "
            f"train on (it knows {', '.join(KINDS)}); set device: cpu"
        )
    return found.type


def resolve(requested: str) -> DeviceKind:
    """The kind of device ``requested`` names, after checking that it exists in this process.

    Raises ``DependencyError`` (exit code EXIT_DEPENDENCY) naming the device and what provides
    it when it is missing, and ``ConfigError`` for a request that names no device."""
    kind = KINDS[requested_type(requested)]
    if kind.type == "cuda":
        _require_cuda(kind)
    elif kind.type == "neuron":
        _require_neuron(kind)
    return kind


def kind_of(device: torch.device) -> DeviceKind:
    """The table entry of a resolved device (what the torch backend reads on the hot path)."""
    return KINDS[device.type]


def measures_peak_flops(device: torch.device) -> bool:
    """Whether the MFU peak is timed in this process (CPU). False for the nxd backend's xla
    device too, which is not in the table."""
    kind = KINDS.get(device.type)
    return kind is not None and kind.measures_peak_flops


def _require_cuda(kind: DeviceKind) -> None:
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a build without CUDA"
    elif not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) finds no GPU: no NVIDIA "
            "driver, or no GPU given to this process"
        )
    else:
        return
    raise DependencyError(
        f"device: cuda needs {kind.provider}; {why}. Run on a GPU node with the NVIDIA driver "
        "and a CUDA build of torch, or set device: cpu (or auto)"
    )


def _require_neuron(kind: DeviceKind) -> None:
    fix = (
        f"install it from the AWS Neuron repository {NEURON_REPOSITORY} (the 2.13/2.14 family "
        "matching torch), as the trn2/trn3 trainer image (Dockerfile target trainer-neuron) "
        "does, or set device: cpu (or auto); on trn1 use backend: nxd"
    )
    try:
        # The distributed guide imports it explicitly: it registers the device and the "neuron"
        # process-group backend (PyTorch also autoloads it unless
        # TORCH_DEVICE_BACKEND_AUTOLOAD=0; importing again is then a no-op).
        importlib.import_module(NEURON_PACKAGE)
    except ImportError as exc:
        raise DependencyError(
            f"device: neuron needs {kind.provider}; {NEURON_PACKAGE} is not importable here "
            f"({exc}); {fix}"
        ) from exc
    module = getattr(torch, "neuron", None)
    if module is None:
        # The XLA-based torch-neuronx of trn1 imports as torch_neuronx too but registers no
        # "neuron" device; so does TorchNeuron when another PrivateUse1 backend came first.
        raise DependencyError(
            f"device: neuron needs {kind.provider}; {NEURON_PACKAGE} imported but registered no "
            f"'neuron' device (the XLA-based torch-neuronx of trn1, or another PrivateUse1 "
            f"backend registered first); {fix}"
        )
    if not module.is_available():
        raise DependencyError(
            f"device: neuron: {NEURON_PACKAGE} is installed but no NeuronCore is visible to this "
            "process (no Neuron driver, or no NeuronCores given to the container); run on a "
            "trn2/trn3 node, or set device: cpu (or auto)"
        )


# --- this process's device ---------------------------------------------------------------------

_current: torch.device | None = None


def place(kind: DeviceKind, local_rank: int) -> torch.device:
    """This rank's device, made the process's current device and recorded for ``current()``.

    Index: the local rank, as torchrun numbers the processes of a node, when the process sees
    several devices (TorchTitan's ``torch.device(f"{type}:{LOCAL_RANK}")`` followed by the
    device module's ``set_device``, which TorchNeuron documents as running unchanged); 0 when
    the process sees exactly one (a launcher that gives each process its own device through
    CUDA_VISIBLE_DEVICES or NEURON_RT_VISIBLE_CORES)."""
    global _current
    if not kind.indexed:
        device = torch.device(kind.type)
    else:
        module = torch.get_device_module(kind.type)
        count = int(module.device_count())
        if count > 1 and local_rank >= count:
            raise ConfigError(
                f"local rank {local_rank} but this process sees {count} {kind.type} devices: "
                f"start at most {count} processes per node"
            )
        device = torch.device(kind.type, local_rank if count > 1 else 0)
        module.set_device(device)
    _current = device
    return device


def current() -> torch.device | None:
    """The device ``place`` chose in this process, or None before (or without) it."""
    return _current


# --- RNG and memory ------------------------------------------------------------------------------


def rng_device() -> torch.device | None:
    """The device whose own generator a checkpoint must capture besides the CPU's: this
    process's accelerator, or None on CPU or before a device was placed."""
    device = _current
    return device if device is not None and kind_of(device).indexed else None


def get_rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state of ``device`` (its device module's ``get_rng_state``)."""
    return torch.get_device_module(device.type).get_rng_state(device)


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    torch.get_device_module(device.type).set_rng_state(state, device)


def max_memory_allocated(device: torch.device) -> int | None:
    """Peak bytes held by tensors on ``device`` since the process started, from its device
    module's allocator, or None where torch keeps no such figure (CPU, or a device module
    without ``max_memory_allocated``). Waits for queued work first: TorchNeuron's allocator is
    asynchronous and its statistics lag the program without a synchronize."""
    kind = KINDS.get(device.type)  # the nxd backend's xla device is not in the table
    if kind is None or not kind.indexed:
        return None
    module: Any = torch.get_device_module(device.type)
    peak = getattr(module, "max_memory_allocated", None)
    if peak is None:
        return None
    sync = getattr(module, "synchronize", None)
    if sync is not None:
        sync()
    # No argument: the current device, which place() made this rank's.
    return int(peak())


def describe(device: torch.device) -> str:
    """One line for the log: the device and what it implies."""
    kind = kind_of(device)
    return (
        f"device {device} (process group {kind.process_group}, autocast {kind.autocast}, "
        f"torch.compile backend {kind.compile_backend})"
    )
