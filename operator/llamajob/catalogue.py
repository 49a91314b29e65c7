"""Instance types a LlamaTrainingJob can run on, and the figures the planner uses.

Sources:
- trn1/trn1n: Neuron docs, "AWS Trn1/Trn1n Architecture" (16 Trainium devices, 3,040 BF16 TFLOPS,
  512 GiB device memory per instance; EFA 800 Gbps on trn1, 1,600 Gbps on trn1n) and "Trainium
  Architecture" (2 NeuronCore-v2 per device, 32 GiB per device, 190 BF16 TFLOPS per device).
  EFA devices: "How to prepare trn1.32xlarge for multi-node execution" (8 on trn1, 16 on trn1n).
- trn2: Neuron docs, "Amazon EC2 Trn2 Architecture" (16 Trainium2 devices, 10.7 dense BF16
  PFLOPS, 1,536 GiB device memory) and "Trainium2 Architecture" (8 NeuronCore-v3 per device; the
  default logical-core size LNC=2 pairs them, so 64 logical cores of 24 GiB each). EFA: 16 devices
  (3.2 Tbps EFAv3, EC2 accelerated-computing instance specifications).
- Device-plugin resources: the Neuron device plugin advertises ``aws.amazon.com/neuron``
  (devices) and ``aws.amazon.com/neuroncore``; the EFA device plugin ``vpc.amazonaws.com/efa``.
- Prices: on-demand list prices per instance-hour in us-east-1/us-east-2 (EC2 pricing pages;
  trn1.32xlarge matches the $21.50/h the HyperPod tutorial reports). SageMaker HyperPod
  ``ml.*`` prices differ by region and contract: pass ``--price`` to the planner for your own.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class InstanceType:
    name: str
    family: str  # "trn1", "trn2", "trn3", "gpu" or "cpu": what varies by device keys off this
    accelerator: str  # "trainium", "trainium2", "trainium3", the GPU model, or "cpu"
    devices_per_node: int  # chips or GPUs, the unit the device plugin counts
    cores_per_node: int  # ranks per node (torchrun --nproc_per_node): NeuronCores or GPUs
    memory_per_core_gib: float
    peak_tflops_per_node: float  # dense BF16
    efa_devices: int
    price_per_hour: float
    device_resource: str | None  # extended resource for the accelerator
    efa_resource: str | None
    backends: tuple[str, ...]  # trainer backends that can run here, the default first
    device: str  # the torch device of the torch backend here ("neuron", "cuda", "cpu")
    lnc: int | None = None  # logical NeuronCore size (physical cores per rank) on trn2/trn3

    @property
    def backend(self) -> str:
        """The default trainer backend on this type."""
        return self.backends[0]

    @property
    def peak_tflops_per_core(self) -> float:
        return self.peak_tflops_per_node / self.cores_per_node

    @property
    def trainium(self) -> bool:
        return self.accelerator.startswith("trainium")


NEURON_RESOURCE = "aws.amazon.com/neuron"
EFA_RESOURCE = "vpc.amazonaws.com/efa"

INSTANCE_TYPES: dict[str, InstanceType] = {
    "ml.trn1.32xlarge": InstanceType(
        name="ml.trn1.32xlarge",
        family="trn1",
        accelerator="trainium",
        devices_per_node=16,
        cores_per_node=32,
        memory_per_core_gib=16.0,
        peak_tflops_per_node=3040.0,
        efa_devices=8,
        price_per_hour=21.50,
        device_resource=NEURON_RESOURCE,
        efa_resource=EFA_RESOURCE,
        backends=("nxd",),
        device="neuron",  # through torch-xla (no TorchNeuron on trn1)
    ),
    "ml.trn1n.32xlarge": InstanceType(
        name="ml.trn1n.32xlarge",
        family="trn1",
        accelerator="trainium",
        devices_per_node=16,
        cores_per_node=32,
        memory_per_core_gib=16.0,
        peak_tflops_per_node=3040.0,
        efa_devices=16,
        price_per_hour=24.78,
        device_resource=NEURON_RESOURCE,
        efa_resource=EFA_RESOURCE,
        backends=("nxd",),
        device="neuron",  # through torch-xla (no TorchNeuron on trn1)
    ),
    "ml.trn2.48xlarge": InstanceType(
        name="ml.trn2.48xlarge",
        family="trn2",
        accelerator="trainium2",
        devices_per_node=16,
        cores_per_node=64,
        memory_per_core_gib=24.0,
        peak_tflops_per_node=10700.0,
        efa_devices=16,
        price_per_hour=44.70,
        device_resource=NEURON_RESOURCE,
        efa_resource=EFA_RESOURCE,
        backends=("torch", "nxd"),
        device="neuron",
        lnc=2,
    ),
    # Plain CPU nodes (and `llamajob run` on a laptop): the torch backend with gloo. The peak is a
    # placeholder for planning only; the trainer measures the real matmul peak for MFU.
    "cpu": InstanceType(
        name="cpu",
        family="cpu",
        accelerator="cpu",
        devices_per_node=0,
        cores_per_node=2,
        memory_per_core_gib=4.0,
        peak_tflops_per_node=0.2,
        efa_devices=0,
        price_per_hour=0.0,
        device_resource=None,
        efa_resource=None,
        backends=("torch",),
        device="cpu",
    ),
}

INSTANCE_TYPE_NAMES: tuple[str, ...] = tuple(INSTANCE_TYPES)
