# Two commands that work on a fresh machine: `make run` and `make test`.
# Each creates and fills .venv itself. torch is pinned (torch==2.13.0) so pip takes the CPU
# wheel; a bare `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint crd venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[trainer,dev]'
	touch $(STAMP)

venv: $(STAMP)

# A fresh demo each time: the previous run's checkpoints would otherwise be resumed (and the
# injected fault, which fires once per job, would not fire again).
run: $(STAMP)
	rm -rf runs/tiny
	$(BIN)/llamajob run examples/tiny.yaml --chaos-kill-at-step 60

test: $(STAMP)
	$(BIN)/ruff check operator trainer tests benchmarks
	$(BIN)/python -m pytest -q -ra

crd: $(STAMP)
	$(BIN)/llamajob crd > crds/llamatrainingjobs.llamajob.dev.yaml
	cp crds/llamatrainingjobs.llamajob.dev.yaml charts/llamajob/crds/

clean:
	rm -rf $(VENV) .pytest_cache
