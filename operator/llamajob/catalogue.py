"""Instance types a LlamaTrainingJob can run on, and the figures the planner uses.

Every figure below comes from a public source; the entry's comment names the source and any
figure that could not be confirmed. docs/instances.md has the same table for readers.

Sources (AWS Neuron documentation, https://awsdocs-neuron.readthedocs-hosted.com/en/latest/):
- [trn1] "Trainium Architecture" (about-neuron/arch/neuron-hardware/trainium.html): 2
  NeuronCore-v2, 190 BF16 TFLOPS and 32 GiB per chip. "Amazon EC2 Trn1/Trn1n Architecture"
  (.../trn1-arch.html): 16 chips, 3,040 BF16 TFLOPS, 512 GiB per instance. "How to prepare
  trn1.32xlarge for multi-node execution" (frameworks/torch/torch-neuronx/
  setup-trn1-multi-node-execution.html): 8 EFA devices on trn1, 16 on trn1n.
- [trn2] "Trainium2 Architecture" (.../trainium2.html): 8 NeuronCore-v3, 667 dense BF16 TFLOPS
  and 96 GiB per chip. "Amazon EC2 Trn2 Architecture" (.../trn2-arch.html): 16 chips, 1,536 GiB,
  10.7 BF16 PFLOPS (= 16 x 667, rounded), 3,200 Gbps EFAv3. "Logical NeuronCore configuration"
  (about-neuron/arch/neuron-features/logical-neuroncore-config.html): LNC=2 is the default and
  a trn2.48xlarge then presents 64 NeuronCores; a chip's four 24 GiB HBM banks are each shared
  by two physical cores, so one bank per logical core.
- [trn3] "Trainium3 Architecture" (.../trainium3.html): 8 NeuronCore-v4, 671 dense BF16 TFLOPS
  and 144 GiB per chip. "Amazon EC2 Trn3 Architecture" (.../trn3-arch.html): a Gen1 UltraServer
  is 4 servers of 16 chips with 12,800 Gbps of EFA (3,200 Gbps a server); Gen2 is 36 servers of
  4 chips. The Logical NeuronCore page says LNC applies to Trn3 too and allows only 1 or 2,
  but states the default for Trn2 only; LNC=2 here follows the compiler's documented default
  (compiler/neuronx-cc/api-reference-guide) and the Trn3 GPT-OSS tutorial, which runs 8 x TP 8
  at LNC=2 on one instance: 64 logical cores on 16 chips.
- [torchneuron] "PyTorch support on Neuron" (frameworks/torch/about/index.html): TorchNeuron,
  the native `neuron` device backend, targets Trn2 and Trn3; torch-neuronx on torch-xla is the
  Trn1 stack. "Announcing End of Support for NxDT and NxD Core Training APIs Starting with
  PyTorch 2.10" (about-neuron/announcements/neuron2.x/
  announcement-end-of-support-nxdt-nxd-core.html); NxD Training's only hardware backends are
  trn1 and trn2 (`--hw_backend trn1|trn2`, archived NxDT checkpoint-conversion guide).
- [neuron-dra] "AWS Neuron Dynamic Resource Allocation (DRA)" (deploy/eks/dra.html): the device
  plugin request of a 16-chip node is aws.amazon.com/neuron: 16 with vpc.amazonaws.com/efa: 16.

Other sources:
- [hyperpod] SageMaker HyperPod CLI, `INSTANCE_RESOURCES` (GPUs, Trainium chips, EFA devices per
  `ml.` type): https://github.com/aws/sagemaker-hyperpod-cli/blob/main/src/sagemaker/hyperpod/
  training/constants.py . The `ml.` names are those of the SageMaker API's ClusterInstanceType
  (https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_ClusterInstanceGroupDetails.html);
  that list has no Trainium3 type, so trn3 is here under its EC2 name.
- [ec2-gpu] GPU memory per GPU as EC2 DescribeInstanceTypes reports it (GpuInfo ... MemoryInfo
  SizeInMiB), as recorded in the SkyPilot AWS catalogue:
  https://github.com/skypilot-org/skypilot-catalog/blob/master/catalogs/v8/aws/vms.csv
  These are what the instance exposes (e.g. 22,888 MiB on an A10G sold as 24 GB).
- [price] On-demand Linux price per instance-hour, EC2 (not SageMaker `ml.`) list price,
  us-east-1 unless noted: https://instances.vantage.sh/aws/ec2/<type> , the same figures as the
  SkyPilot catalogue above. SageMaker HyperPod prices differ by region and contract: pass
  `--price` to the planner for your own. 0.0 means no published on-demand price.
- [trn3-name] The EC2 name trn3.48xlarge is the 16-chip Trn3 server in the open Neuron driver's
  platform table (https://github.com/aws-neuron/aws-neuron-driver/blob/master/v4/
  neuron_dhal_v4.c); the EC2 API model (botocore InstanceType) does not list Trn3 yet.
- GPU peaks, dense BF16 per GPU (datasheets quote "with sparsity" figures at twice these):
  [a10g] NVIDIA A10G for AWS: 70 TFLOPS (the plain A10's 125 does not apply),
  https://d1.awsstatic.com/product-marketing/ec2/NVIDIA_AWS_A10G_DataSheet_FINAL_02_17_2022.pdf
  [l40s] NVIDIA L40S datasheet: 362.05 TFLOPS,
  https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413
  [a100] NVIDIA A100 datasheet: 312 TFLOPS (40 GB and 80 GB SXM alike),
  https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
  [h100] NVIDIA H100 SXM: 1,979 TFLOPS with sparsity, so 989.5 dense,
  https://www.nvidia.com/en-us/data-center/h100/
  [h200] NVIDIA H200 SXM: the same 1,979 with sparsity, so 989.5 dense,
  https://www.nvidia.com/en-us/data-center/h200/
  [b200] NVIDIA HGX B200, per GPU: 4.5 PFLOPS FP16/BF16 with sparsity, so 2,250 TFLOPS dense,
  https://www.nvidia.com/en-us/data-center/hgx/
- [host] Host vCPUs and memory per node (what the default cpu and memory requests are taken
  from): the Neuron architecture pages above for Trainium (trn1/trn1n.32xlarge: 128 vCPUs and
  512 GiB; trn2.48xlarge: 192 vCPUs and 2,048 GiB "Host Memory"), and the SageMaker HyperPod
  CLI's ``INSTANCE_RESOURCES`` [hyperpod] ("cpu", "memory" in GiB) for the GPU types, which
  agree with EC2's figures (e.g. the g5 sizes in the AWS Batch "GPU jobs" table,
  https://docs.aws.amazon.com/batch/latest/userguide/gpu-jobs.html). No public source gives
  the host vCPUs or memory of a Trn3 server, so trn3.48xlarge has none (and so no default
  requests: set spec.cluster.cpu and memory).
- [reserved] What a node keeps back from pods: the EKS AMIs' kube-reserved is 255 MiB + 11 MiB
  per pod the node may run (11 x max-pods + 255) and 6% of the first core, 1% of the second,
  0.5% of the next two and 0.25% of the rest
  (https://github.com/awslabs/amazon-eks-ami, nodeadm's kubelet defaults and the former
  bootstrap.sh), plus a 100Mi hard-eviction threshold; the SageMaker HyperPod CLI caps a
  pod's memory at 93% of the instance's (``MAX_MEMORY_PROPORTION`` in
  src/sagemaker/hyperpod/training/quota_allocation_util.py of the repository above).
- Device-plugin resources: the Neuron device plugin advertises ``aws.amazon.com/neuron``
  (chips) and ``aws.amazon.com/neuroncore``; the NVIDIA one ``nvidia.com/gpu``; the EFA device
  plugin ``vpc.amazonaws.com/efa``.
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
    price_per_hour: float  # 0.0 where no on-demand price is published: never divide by it
    device_resource: str | None  # extended resource for the accelerator
    efa_resource: str | None
    backends: tuple[str, ...]  # trainer backends that can run here, the default first
    device: str  # the torch device of the torch backend here ("neuron", "cuda", "cpu")
    lnc: int | None = None  # logical NeuronCore size (physical cores per rank) on trn2/trn3
    # The node's vCPUs and memory [host]; None where unknown (trn3) or where "the node" is any
    # machine (cpu). They size the pods' default cpu and memory requests: see pod_cpu.
    vcpus: int | None = None
    host_memory_gib: int | None = None

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

    @property
    def pod_cpu(self) -> int | None:
        """Default cpu request (= limit) of a pod on this type, in whole cores: POD_SHARE_PERCENT of
        the vCPUs, rounded down. None without host figures."""
        return None if self.vcpus is None else self.vcpus * POD_SHARE_PERCENT // 100

    @property
    def pod_memory_gib(self) -> int | None:
        """Default memory request (= limit) of a pod on this type, in whole GiB: POD_SHARE_PERCENT
        of the memory, rounded down. None without host figures."""
        if self.host_memory_gib is None:
            return None
        return self.host_memory_gib * POD_SHARE_PERCENT // 100


# A training pod takes its whole node (all its chips or GPUs and all its EFA devices, so no
# other such pod fits beside it) and by default requests this share of the node's vCPUs and
# memory, requests equal to limits, which makes it Guaranteed QoS: the last to be evicted or
# OOM-killed under node pressure. The other 10% is for what the node keeps back and the
# daemonsets it runs (device plugins, aws-node, kube-proxy, node-exporter, the HyperPod health
# agent, log and CSI agents). On the smallest type here (32 vCPUs, 128 GiB) that leaves 4 cores
# and 13 GiB, against an EKS kube-reserved of 0.15 cores and 2.9 GiB even at 250 pods
# [reserved], and a kernel that reports a few percent less memory than the nominal figure; on
# the largest (192 vCPUs, 2,048 GiB), 20 cores and 205 GiB. HyperPod's own CLI lets a pod have
# up to 93% of the memory [reserved].
POD_SHARE_PERCENT = 90

NEURON_RESOURCE = "aws.amazon.com/neuron"
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"


def _gpu(
    name: str,
    accelerator: str,
    gpus: int,
    memory_mib: int,
    tflops_per_gpu: float,
    efa: int,
    price: float,
    host: tuple[int, int],
) -> InstanceType:
    """A GPU node: one rank per GPU, torch on cuda. Memory is given in MiB as EC2 reports it,
    so that the figure in the table is the source's own; ``host`` is (vCPUs, GiB) [host]."""
    return InstanceType(
        name=name,
        family="gpu",
        accelerator=accelerator,
        devices_per_node=gpus,
        cores_per_node=gpus,
        memory_per_core_gib=memory_mib / 1024,
        peak_tflops_per_node=tflops_per_gpu * gpus,
        efa_devices=efa,
        price_per_hour=price,
        device_resource=GPU_RESOURCE,
        # Types without EFA must not request the resource: no node would offer it.
        efa_resource=EFA_RESOURCE if efa else None,
        backends=("torch",),
        device="cuda",
        vcpus=host[0],
        host_memory_gib=host[1],
    )


# Dense BF16 TFLOPS per GPU and EC2's MiB per GPU, by model (see the module docstring).
A10G_TFLOPS, A10G_MIB = 70.0, 22888  # [a10g], [ec2-gpu]
L40S_TFLOPS, L40S_MIB = 362.05, 45776  # [l40s], [ec2-gpu]
A100_TFLOPS = 312.0  # [a100]
A100_40GB_MIB, A100_80GB_MIB = 40960, 81920  # [ec2-gpu] p4d, p4de
H100_TFLOPS, H100_MIB = 989.5, 81920  # [h100], [ec2-gpu]
H200_TFLOPS, H200_MIB = 989.5, 144384  # [h200], [ec2-gpu] p5e and p5en
B200_TFLOPS, B200_MIB = 2250.0, 183359  # [b200], [ec2-gpu]

INSTANCE_TYPES: dict[str, InstanceType] = {
    "ml.trn1.32xlarge": InstanceType(
        name="ml.trn1.32xlarge",
        family="trn1",
        accelerator="trainium",
        devices_per_node=16,
        cores_per_node=32,  # 2 NeuronCore-v2 per chip [trn1]
        memory_per_core_gib=16.0,  # 32 GiB per chip [trn1]
        peak_tflops_per_node=3040.0,  # 16 x 190 [trn1]
        efa_devices=8,  # [trn1], [hyperpod]
        price_per_hour=21.50,  # [price]
        device_resource=NEURON_RESOURCE,
        efa_resource=EFA_RESOURCE,
        backends=("nxd",),
        device="neuron",  # through torch-xla (no TorchNeuron on trn1) [torchneuron]
        vcpus=128,  # [trn1], [host]
        host_memory_gib=512,
    ),
    "ml.trn1n.32xlarge": InstanceType(
        name="ml.trn1n.32xlarge",
        family="trn1",
        accelerator="trainium",
        devices_per_node=16,
        cores_per_node=32,
        memory_per_core_gib=16.0,
        peak_tflops_per_node=3040.0,
        efa_devices=16,  # [trn1], [hyperpod]
        price_per_hour=24.78,  # [price]
        device_resource=NEURON_RESOURCE,
        efa_resource=EFA_RESOURCE,
        backends=("nxd",),
        device="neuron",  # through torch-xla (no TorchNeuron on trn1) [torchneuron]
        vcpus=128,  # [trn1], [host]
        host_memory_gib=512,
    ),
    "ml.trn2.48xlarge": InstanceType(
        name="ml.trn2.48xlarge",
        family="trn2",
        accelerator="trainium2",
        devices_per_node=16,
        cores_per_node=64,  # 16 chips x 8 NeuronCore-v3 / LNC 2 [trn2]
        memory_per_core_gib=24.0,  # 96 GiB per chip / 4 logical cores [trn2]
        peak_tflops_per_node=10672.0,  # 16 x 667 [trn2]
        # Some listings count 32 EFAv3 interfaces; the EFA device plugin count AWS uses for a
        # trn2.48xlarge pod is 16 [hyperpod], [neuron-dra].
        efa_devices=16,
        # us-east-2: the only region with a published on-demand price for trn2.48xlarge
        # (instances.vantage.sh, Nov 2025) [price]; a $44.70 figure could not be confirmed.
        price_per_hour=35.76,
        device_resource=NEURON_RESOURCE,
        efa_resource=EFA_RESOURCE,
        backends=("torch", "nxd"),  # TorchNeuron; NxD training still lists trn2 [torchneuron]
        device="neuron",
        lnc=2,
        vcpus=192,  # [trn2]: 192 vCPUs and 2,048 GiB of host memory [host]
        host_memory_gib=2048,
    ),
    # Not a SageMaker HyperPod type (no ml.trn3 in the SageMaker API) [hyperpod]: plain EKS only
    # (spec.cluster.hyperpod: false). On Trn3 UltraServer nodes ("trn3pds") the Neuron docs use
    # the DRA driver instead of the device plugin; set spec.cluster.nodeSelector for them.
    "trn3.48xlarge": InstanceType(
        name="trn3.48xlarge",  # [trn3-name]
        family="trn3",
        accelerator="trainium3",
        devices_per_node=16,  # one Gen1 UltraServer server [trn3]
        cores_per_node=64,  # 16 chips x 8 NeuronCore-v4 / LNC 2 [trn3]
        memory_per_core_gib=36.0,  # 144 GiB per chip / 4 logical cores [trn3]
        peak_tflops_per_node=10736.0,  # 16 x 671 [trn3] (= 42,944 / 4 servers)
        # UNCONFIRMED: no public source gives the EFA device count. The server has 3,200 Gbps
        # of EFA [trn3], as a trn2.48xlarge does over 16 devices [neuron-dra]; 16 assumes the
        # same 200 Gbps per device. Check the node's allocatable vpc.amazonaws.com/efa.
        efa_devices=16,
        price_per_hour=0.0,  # not published [price]
        device_resource=NEURON_RESOURCE,
        efa_resource=EFA_RESOURCE,
        # TorchNeuron only: NxD training ends with PyTorch 2.9 and never had a trn3 backend.
        backends=("torch",),
        device="neuron",
        lnc=2,
        # vcpus, host_memory_gib: UNCONFIRMED, no public figure [host]; without them the pods
        # request no cpu or memory unless spec.cluster.cpu and memory say so.
    ),
    # GPU nodes for FSDP on CUDA. GPUs and EFA per node [hyperpod]; GPU memory [ec2-gpu]; price
    # us-east-1 EC2 on-demand [price]; the last argument, host vCPUs and GiB [host].
    "ml.g5.8xlarge": _gpu(
        "ml.g5.8xlarge", "nvidia-a10g", 1, A10G_MIB, A10G_TFLOPS, 1, 2.448, (32, 128)
    ),
    "ml.g5.12xlarge": _gpu(
        "ml.g5.12xlarge", "nvidia-a10g", 4, A10G_MIB, A10G_TFLOPS, 1, 5.672, (48, 192)
    ),
    "ml.g5.24xlarge": _gpu(
        "ml.g5.24xlarge", "nvidia-a10g", 4, A10G_MIB, A10G_TFLOPS, 1, 8.144, (96, 384)
    ),
    "ml.g5.48xlarge": _gpu(
        "ml.g5.48xlarge", "nvidia-a10g", 8, A10G_MIB, A10G_TFLOPS, 1, 16.288, (192, 768)
    ),
    "ml.g6e.8xlarge": _gpu(
        "ml.g6e.8xlarge", "nvidia-l40s", 1, L40S_MIB, L40S_TFLOPS, 1, 4.52856, (32, 256)
    ),
    "ml.g6e.12xlarge": _gpu(
        "ml.g6e.12xlarge", "nvidia-l40s", 4, L40S_MIB, L40S_TFLOPS, 1, 10.49264, (48, 384)
    ),
    "ml.g6e.24xlarge": _gpu(
        "ml.g6e.24xlarge", "nvidia-l40s", 4, L40S_MIB, L40S_TFLOPS, 2, 15.06559, (96, 768)
    ),
    "ml.g6e.48xlarge": _gpu(
        "ml.g6e.48xlarge", "nvidia-l40s", 8, L40S_MIB, L40S_TFLOPS, 4, 30.13118, (192, 1536)
    ),
    "ml.p4d.24xlarge": _gpu(
        "ml.p4d.24xlarge",
        "nvidia-a100-40gb",
        8,
        A100_40GB_MIB,
        A100_TFLOPS,
        4,
        21.957642,
        (96, 1152),
    ),
    "ml.p4de.24xlarge": _gpu(
        "ml.p4de.24xlarge",
        "nvidia-a100-80gb",
        8,
        A100_80GB_MIB,
        A100_TFLOPS,
        4,
        27.44705,
        (96, 1152),
    ),
    "ml.p5.48xlarge": _gpu(
        "ml.p5.48xlarge", "nvidia-h100", 8, H100_MIB, H100_TFLOPS, 32, 55.04, (192, 2048)
    ),
    # p5e.48xlarge has no on-demand price: EC2 sells it through Capacity Blocks [price].
    "ml.p5e.48xlarge": _gpu(
        "ml.p5e.48xlarge", "nvidia-h200", 8, H200_MIB, H200_TFLOPS, 32, 0.0, (192, 2048)
    ),
    "ml.p5en.48xlarge": _gpu(
        "ml.p5en.48xlarge", "nvidia-h200", 8, H200_MIB, H200_TFLOPS, 16, 63.296, (192, 2048)
    ),
    "ml.p6-b200.48xlarge": _gpu(
        "ml.p6-b200.48xlarge", "nvidia-b200", 8, B200_MIB, B200_TFLOPS, 8, 113.9328, (192, 2048)
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
