# Two images from one file (docs/install.md, "Building the images"):
#   docker build --target operator -t <registry>/llamajob-operator:0.1.0 .
#   docker build --target trainer  -t <registry>/llamajob-trainer:0.1.0 .
# Bases are pinned to exact tags; pin them by digest too (`name:tag@sha256:...`) in production.

# Slim Debian Python for the operator; the minor version follows requires-python in pyproject.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# AWS Deep Learning Container for PyTorch training on Trainium: torch, torch-neuronx,
# neuronx-distributed, the Neuron compiler and runtime, EFA libraries, torchrun and
# neuron_parallel_compile. Python 3.11, as requires-python needs. Pulling it needs
# `aws ecr get-login-password --region us-west-2 | docker login --username AWS
#  --password-stdin 763104351884.dkr.ecr.us-west-2.amazonaws.com`.
ARG BASE_IMAGE=763104351884.dkr.ecr.us-west-2.amazonaws.com/pytorch-training-neuronx:2.8.0-neuronx-py311-sdk2.26.1-ubuntu22.04

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

# ---- trainer: the Neuron DLC with our package added, its torch and Neuron stack untouched -----
FROM ${BASE_IMAGE} AS trainer
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# 1. Freeze the image's torch and Neuron packages as constraints, so nothing below can replace
#    them, not even as a transitive dependency.
# 2. Our package with --no-deps: its `trainer` extra pins a CPU torch that must not land here.
# 3. Then the light dependencies (pyproject's dependencies plus the `trainer` extra, less torch),
#    installed only where the image lacks them or has a version outside the range.
RUN pip freeze | grep -iE '^(torch|torchvision|torch-xla|torch-neuronx|neuronx-cc|neuronx-distributed|libneuronxla)==' > /tmp/neuron-constraints.txt \
    && pip install --no-deps /wheels/llamajob-*.whl \
    && pip install --constraint /tmp/neuron-constraints.txt \
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
    && rm -rf /wheels /tmp/neuron-constraints.txt
# Fail the build, not the first training job, if the launchers the operator uses are missing.
RUN command -v torchrun && command -v neuron_parallel_compile \
    && python -c "import torch, llamajob_trainer.config, llamajob_trainer.metrics" \
    && llamajob --version
# The DLC's own user is kept, as in the AWS Neuron training examples.
WORKDIR /workspace
