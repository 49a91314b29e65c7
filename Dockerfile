# Four images from one file (docs/install.md, "Building the images"):
#   docker build --target operator       -t <registry>/llamajob-operator:0.1.0 .
#   docker build --target trainer-neuron -t <registry>/llamajob-trainer:0.1.0-neuron .
#   docker build --target trainer-cuda   -t <registry>/llamajob-trainer:0.1.0-cuda .
#   docker build --target trainer-trn1   -t <registry>/llamajob-trainer:0.1.0-trn1 .
# trainer-neuron: trn2/trn3 on the torch backend (TorchNeuron); trainer-cuda: the GPU instance
# types; trainer-trn1: the nxd backend (NeuronX Distributed on torch-xla), the only one on
# trn1/trn1n. Bases are pinned to exact tags; pin them by digest too (`name:tag@sha256:...`) in
# production.

# Slim Debian Python for the operator; the minor version follows requires-python in pyproject.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# The nxd trainer: AWS's PyTorch/XLA training Deep Learning Container of Neuron 2.28.0 (torch
# 2.9.0, torch-neuronx 2.9.0.2.12, neuronx-cc 2.23, neuronx-distributed 0.17, NxD Training 1.7.0,
# EFA libraries, torchrun and neuron_parallel_compile; Python 3.12). AWS keeps NxD users on
# "Neuron 2.28 and PyTorch 2.9" (Neuron release notes, Neuron Containers 2.29.0 callout), and
# PyTorch/XLA training DLCs stop after 2.30. Tag from the aws-neuron/deep-learning-containers
# README, pytorch-training-neuronx table (https://github.com/aws-neuron/deep-learning-containers).
ARG TRN1_BASE_IMAGE=public.ecr.aws/neuron/pytorch-training-neuronx:2.9.0-neuronx-py312-sdk2.28.0-ubuntu24.04
# The TorchNeuron and CUDA trainers start from the Ubuntu the Neuron DLCs are built FROM (their
# Dockerfiles in the same repository): 24.04, Python 3.12. TorchNeuron supports Ubuntu 24.04
# (TorchNeuron release notes, Neuron 2.33.0, support matrix). The Neuron 2.33 DLCs moved to
# Ubuntu 26.04 with Python 3.14 and torch-neuronx 2.14 only; this image keeps torch 2.13, the
# version the trainer is pinned to and tested with.
ARG UBUNTU_IMAGE=public.ecr.aws/docker/library/ubuntu:24.04

# The trainer's torch: pyproject's pin (tests/test_dockerfile.py keeps the two equal).
ARG TORCH_VERSION=2.13.0
# Neuron 2.33.0 release content (https://awsdocs-neuron.readthedocs-hosted.com/en/v2.33.0/
# release-notes/releasecontent.html and the component index): TorchNeuron torch-neuronx 2.13.3.0
# for PyTorch 2.13 (2.14.3.0 for 2.14: "install the torch-neuronx package family that matches the
# PyTorch version"), neuronx-cc 2.28.7631.0, NKI 0.7.0, runtime 2.35.30.0, collectives 2.35.43.0.
ARG NEURON_SDK_VERSION=2.33.0
ARG TORCH_NEURONX_VERSION=2.13.3.0
ARG NEURONX_CC_VERSION=2.28.7631.0
ARG NKI_VERSION=0.7.0
ARG NEURON_RUNTIME_VERSION=2.35.30.0
ARG NEURON_COLLECTIVES_VERSION=2.35.43.0
# libfabric with the EFA provider, and aws-ofi-nccl (NCCL over EFA) under /opt/amazon/ofi-nccl:
# the version AWS's nccl-tests image installs (awsome-distributed-training,
# micro-benchmarks/nccl-tests/nccl-tests.Dockerfile).
ARG EFA_INSTALLER_VERSION=1.47.0

# ---- build: one wheel holding both import packages (llamajob, llamajob_trainer) ---------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- operator: kopf shell and pure core; no torch (it is only in the `trainer` extra) --------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/llamajob-*.whl \
    && rm -rf /wheels \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && llamajob --version
# The chart runs it as this user too (runAsUser 10001) with a read-only root filesystem.
RUN groupadd --system --gid 10001 llamajob \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin llamajob
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["llamajob", "operator"]

# Every trainer below installs our package the same way, after its torch stack:
# 1. Freeze the image's torch stack as constraints, so nothing below can replace it, not even as
#    a transitive dependency.
# 2. Our package with --no-deps: its `trainer` extra would otherwise pull PyPI's torch.
# 3. Then the light dependencies (pyproject's dependencies plus the `trainer` extra, less torch),
#    installed only where the image lacks them or has a version outside the range.
# No trainer sets an ENTRYPOINT: the operator's pods give the whole command (torchrun ...), which
# replaces it anyway.

# ---- trainer-trn1: the Neuron 2.28 DLC with our package added, its stack untouched -----------
FROM ${TRN1_BASE_IMAGE} AS trainer-trn1
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip freeze | grep -iE '^(torch|torchvision|torch[-_]xla|torch[-_]neuronx|neuronx[-_]cc|neuronx[-_]distributed|neuronx[-_]distributed[-_]training|libneuronxla)==' > /tmp/torch-constraints.txt \
    && pip install --no-deps /wheels/llamajob-*.whl \
    && pip install --constraint /tmp/torch-constraints.txt \
        "pydantic>=2.11,<3" \
        "pyyaml>=6" \
        "kopf>=1.45,<2" \
        "aiohttp>=3.10" \
        "prometheus-client>=0.21" \
        "rich>=13" \
        "numpy>=1.26" \
        "safetensors>=0.4" \
        "tokenizers>=0.20" \
        "pyarrow>=15" \
    && rm -rf /wheels /tmp/torch-constraints.txt
# Fail the build, not the first training job, if the stack or the launchers are not the ones the
# operator's nxd pods use.
RUN command -v torchrun && command -v neuron_parallel_compile \
    && python -c "from importlib.metadata import version as v; t, n = v('torch'), v('torch-neuronx'); v('neuronx-distributed'); assert t.startswith('2.9.') and n.startswith('2.9.'), (t, n)" \
    && python -c "import llamajob_trainer.config, llamajob_trainer.metrics" \
    && llamajob --version
# The DLC's own user is kept, as in the AWS Neuron training examples.
WORKDIR /workspace

# ---- trainer-neuron: TorchNeuron (native PyTorch on trn2/trn3) from the Neuron repositories ---
# The steps of the Neuron 2.33 setup pages: the Neuron runtime and collectives from the Neuron apt
# repository, EFA without its kernel module (the host has it: "How to prepare trn1.32xlarge for
# multi-node execution", Containers), then TorchNeuron, the compiler and NKI from the Neuron pip
# repository with torch from PyTorch's CPU index ("Update a manual PyTorch installation", v2.33.0:
# https://awsdocs-neuron.readthedocs-hosted.com/en/v2.33.0/setup/pytorch/update-manual.html).
FROM ${UBUNTU_IMAGE} AS trainer-neuron
ARG TORCH_VERSION
ARG NEURON_SDK_VERSION
ARG TORCH_NEURONX_VERSION
ARG NEURONX_CC_VERSION
ARG NKI_VERSION
ARG NEURON_RUNTIME_VERSION
ARG NEURON_COLLECTIVES_VERSION
ARG EFA_INSTALLER_VERSION
LABEL dev.llamajob.neuron-sdk="${NEURON_SDK_VERSION}"
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/opt/aws/neuron/bin:/opt/amazon/efa/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/aws/neuron/lib:/opt/amazon/efa/lib:/opt/amazon/efa/lib64
# The apt suite is the one AWS's own Ubuntu 24.04 Neuron DLC Dockerfiles use (jammy).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg python3 python3-venv \
    && install -m 0755 -d /etc/apt/keyrings \
    && curl -fsSL https://apt.repos.neuron.amazonaws.com/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB \
        | gpg --dearmor -o /etc/apt/keyrings/neuron.gpg \
    && echo "deb [signed-by=/etc/apt/keyrings/neuron.gpg] https://apt.repos.neuron.amazonaws.com jammy main" \
        > /etc/apt/sources.list.d/neuron.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        "aws-neuronx-runtime-lib=${NEURON_RUNTIME_VERSION}*" \
        "aws-neuronx-collectives=${NEURON_COLLECTIVES_VERSION}*" \
    && cd /tmp \
    && curl -fsSLO "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
    && tar -xf "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
    && cd aws-efa-installer \
    && ./efa_installer.sh -y -g --skip-kmod --skip-limit-conf --no-verify \
    && cd / \
    && rm -rf /tmp/aws-efa-installer* /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && pip install \
        "torch==${TORCH_VERSION}" \
        "torch-neuronx==${TORCH_NEURONX_VERSION}" \
        "neuronx-cc==${NEURONX_CC_VERSION}" \
        "nki==${NKI_VERSION}" \
        --extra-index-url https://pip.repos.neuron.amazonaws.com \
        --extra-index-url https://download.pytorch.org/whl/cpu
COPY --from=build /wheels /wheels
RUN pip freeze | grep -iE '^(torch|torch[-_]neuronx|neuronx[-_]cc|nki)==' > /tmp/torch-constraints.txt \
    && pip install --no-deps /wheels/llamajob-*.whl \
    && pip install --constraint /tmp/torch-constraints.txt \
        "pydantic>=2.11,<3" \
        "pyyaml>=6" \
        "kopf>=1.45,<2" \
        "aiohttp>=3.10" \
        "prometheus-client>=0.21" \
        "rich>=13" \
        "numpy>=1.26" \
        "safetensors>=0.4" \
        "tokenizers>=0.20" \
        "pyarrow>=15" \
    && rm -rf /wheels /tmp/torch-constraints.txt
# Versions from the package metadata, not an import: the build host has no Neuron device, and
# torch autoloads torch_neuronx. No neuron_parallel_compile: that is torch-xla's tool.
RUN command -v torchrun && command -v neuronx-cc \
    && python -c "from importlib.metadata import version as v; t, n = v('torch'), v('torch-neuronx'); assert t.startswith('${TORCH_VERSION}') and n.startswith('${TORCH_NEURONX_VERSION}'), (t, n)" \
    && python -c "import llamajob_trainer.config, llamajob_trainer.metrics" \
    && llamajob --version
WORKDIR /workspace

# ---- trainer-cuda: PyPI's CUDA build of torch, NCCL over EFA ----------------------------------
# torch 2.13.0 on PyPI is the CUDA 13.0 build (its wheel requires nvidia-nccl-cu13 2.29.7 and the
# other cu13 libraries), so the image needs no CUDA toolkit; the host's NVIDIA driver (580 or
# newer for CUDA 13.0) comes in through the NVIDIA device plugin. The EFA installer adds libfabric
# and aws-ofi-nccl, which NCCL loads from LD_LIBRARY_PATH, as in AWS's nccl-tests image.
FROM ${UBUNTU_IMAGE} AS trainer-cuda
ARG TORCH_VERSION
ARG EFA_INSTALLER_VERSION
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/opt/amazon/efa/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/efa/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl python3 python3-venv \
    && cd /tmp \
    && curl -fsSLO "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
    && tar -xf "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" \
    && cd aws-efa-installer \
    && ./efa_installer.sh -y -g --skip-kmod --skip-limit-conf --no-verify \
    && cd / \
    && rm -rf /tmp/aws-efa-installer* /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}"
COPY --from=build /wheels /wheels
RUN pip freeze | grep -iE '^(torch|triton|nvidia-[a-z0-9-]+)==' > /tmp/torch-constraints.txt \
    && pip install --no-deps /wheels/llamajob-*.whl \
    && pip install --constraint /tmp/torch-constraints.txt \
        "pydantic>=2.11,<3" \
        "pyyaml>=6" \
        "kopf>=1.45,<2" \
        "aiohttp>=3.10" \
        "prometheus-client>=0.21" \
        "rich>=13" \
        "numpy>=1.26" \
        "safetensors>=0.4" \
        "tokenizers>=0.20" \
        "pyarrow>=15" \
    && rm -rf /wheels /tmp/torch-constraints.txt
# No GPU at build time: check the build's CUDA, not a device.
RUN command -v torchrun \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}') and torch.version.cuda, torch.__version__" \
    && python -c "import llamajob_trainer.config, llamajob_trainer.metrics" \
    && llamajob --version
WORKDIR /workspace
