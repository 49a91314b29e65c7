# Two commands that work on a fresh machine: `make run` and `make test`.
# Each creates and fills .venv itself. torch is pinned (torch==2.13.0) so pip takes the CPU
# wheel; a bare `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-xla lint crd venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[trainer,dev]'
	touch $(STAMP)

venv: $(STAMP)

# The XLA tier (tests_xla/): the trn1 image's torch and torch-xla, run on this CPU through PJRT.
# Its own venv, because the trainer's torch pin (2.13) and torch-xla 2.9 cannot share one. Our
# package goes in with --no-deps: its `trainer` extra would pull the main venv's torch. The rest
# is what the trn1 image adds to its torch stack (pyproject's dependencies and `trainer` extra
# less torch, as in the Dockerfile; tests/test_xla_tier.py checks it) and the test runner. torch
# is named in the same pip call as everything else, so no dependency can bring another torch.
XLA_VENV  := .venv-xla
XLA_BIN   := $(XLA_VENV)/bin
XLA_STAMP := $(XLA_VENV)/.installed
XLA_TORCH := torch==2.9.0 torch-xla==2.9.0
XLA_DEPS  := "pydantic>=2.11,<3" "pyyaml>=6" "kopf>=1.45,<2" "aiohttp>=3.10" \
             "prometheus-client>=0.21" "rich>=13" "numpy>=1.26" "safetensors>=0.4" \
             "tokenizers>=0.20" "pyarrow>=15" \
             "pytest>=8" "pytest-asyncio>=0.24" "pytest-timeout>=2.3"

# The pins live in this file, so it rebuilds the venv when they change (pip keeps what is
# already satisfied).
$(XLA_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_BIN)/pip install --quiet --upgrade pip
	$(XLA_BIN)/pip install --quiet $(XLA_TORCH) $(XLA_DEPS)
	$(XLA_BIN)/pip install --quiet --no-deps -e .
	touch $(XLA_STAMP)

# PJRT_DEVICE=CPU: torch-xla's CPU client stands in for the NeuronCores. The tier never skips:
# without torch-xla it fails at collection (tests_xla/conftest.py).
test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU $(XLA_BIN)/python -m pytest -q -ra tests_xla

# A fresh demo each time: the previous run's checkpoints would otherwise be resumed (and the
# injected fault, which fires once per job, would not fire again).
run: $(STAMP)
	rm -rf runs/tiny
	$(BIN)/llamajob run examples/tiny.yaml --chaos-kill-at-step 60
	@echo "The llamajob command is $(BIN)/llamajob: 'source $(BIN)/activate' puts it on PATH."

# The Kubernetes control plane the real-API-server tests start (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler), built from tools/k8s/go.mod into a cache directory
# outside the repository: about 10 minutes the first time on 2 cores, then reused.
k8s:
	tools/k8s/build.sh >/dev/null

test: $(STAMP) k8s
	$(BIN)/ruff check operator trainer tests tests_xla benchmarks
	$(BIN)/python -m pytest -q -ra
	$(MAKE) --no-print-directory test-xla

crd: $(STAMP)
	$(BIN)/llamajob crd > crds/llamatrainingjobs.llamajob.dev.yaml
	cp crds/llamatrainingjobs.llamajob.dev.yaml charts/llamajob/crds/

clean:
	rm -rf $(VENV) $(XLA_VENV) .pytest_cache
