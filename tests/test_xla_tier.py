"""How the XLA tier (tests_xla/) is set up, read from the Makefile and pyproject.toml: its venv
holds the trn1 image's torch and torch-xla and exactly the packages that image adds, the main
run never collects it, and `make test` runs it. The tier itself runs in its own venv
(`make test-xla`), never here: torch-xla cannot share this venv's torch."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def makefile() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Variables (``:=``) and each target's recipe lines, continuations joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    variables: dict[str, str] = {}
    recipes: dict[str, list[str]] = {}
    target = None
    for line in text.splitlines():
        if line.startswith("\t") and target is not None:
            recipes[target].append(line.strip())
            continue
        target = None
        if match := re.match(r"^([A-Z_]+)\s*:=\s*(.*)$", line):
            variables[match[1]] = " ".join(match[2].split())
        elif match := re.match(r"^([^\s:#=]+):(?!=)", line):
            target = match[1]
            recipes[target] = []
    return variables, recipes


def requirements(words: str) -> dict[str, Requirement]:
    reqs = [Requirement(word) for word in shlex.split(words)]
    return {canonicalize_name(r.name): r for r in reqs}


def test_the_xla_venv_pins_the_trn1_images_torch_and_torch_xla() -> None:
    variables, _ = makefile()
    pins = requirements(variables["XLA_TORCH"])
    image = re.search(r"ARG TRN1_BASE_IMAGE=\S+:(\d+\.\d+\.\d+)-neuronx",
                      (ROOT / "Dockerfile").read_text())
    assert image
    assert {name: str(r.specifier) for name, r in pins.items()} == {
        "torch": f"=={image[1]}", "torch-xla": f"=={image[1]}",
    }


def test_the_xla_venv_has_what_the_trn1_image_adds_and_the_test_runner() -> None:
    """pyproject's dependencies and `trainer` extra less torch (what the trn1 image installs
    beside its own torch stack), and pytest with the plugins pyproject's pytest settings name;
    each with pyproject's version range."""
    variables, _ = makefile()
    installed = {name: str(r.specifier) for name, r in
                 requirements(variables["XLA_DEPS"]).items()}
    project = PYPROJECT["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for r in project["optional-dependencies"]["trainer"]]
    runner = {"pytest", "pytest-asyncio", "pytest-timeout"}
    wanted += [r for r in map(Requirement, project["optional-dependencies"]["dev"])
               if canonicalize_name(r.name) in runner]
    expected = {canonicalize_name(r.name): str(r.specifier) for r in wanted
                if canonicalize_name(r.name) != "torch"}
    assert installed == expected


def test_the_tier_installs_our_package_without_its_dependencies() -> None:
    """Its `trainer` extra pins the main venv's torch; pip would replace torch 2.9 with it."""
    _, recipes = makefile()
    recipe = recipes["$(XLA_STAMP)"]
    installs = [line for line in recipe if " install " in line]
    assert any("$(XLA_TORCH) $(XLA_DEPS)" in line for line in installs)
    assert [line for line in installs if " -e " in line] == [
        "$(XLA_BIN)/pip install --quiet --no-deps -e ."
    ]
    assert recipe[-1] == "touch $(XLA_STAMP)"


def test_make_test_runs_the_tier_after_the_main_suite_which_never_collects_it() -> None:
    variables, recipes = makefile()
    assert PYPROJECT["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    test = recipes["test"]
    assert any(line.endswith("pytest -q -ra") for line in test)
    assert test[-1] == "$(MAKE) --no-print-directory test-xla"
    assert recipes["test-xla"] == [
        "PJRT_DEVICE=CPU $(XLA_BIN)/python -m pytest -q -ra tests_xla"
    ]
    assert f"{variables['XLA_VENV']}/" in (ROOT / ".gitignore").read_text().splitlines()
