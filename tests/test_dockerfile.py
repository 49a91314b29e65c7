"""The Dockerfile's structure. No Docker engine runs here, so the images are never built in
these tests: they read the file as Docker's parser would (continuations joined, comments
dropped, ARG defaults substituted into FROM) and check what can be checked without building.
The build itself also asserts at build time that torchrun and neuron_parallel_compile exist and
that the operator image has no torch.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

NEURON_DLC = re.compile(
    r"^763104351884\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/pytorch-training-neuronx:"
    r"(?P<torch>\d+\.\d+\.\d+)-neuronx-py(?P<py>3\d+)-sdk(?P<sdk>\d+\.\d+\.\d+)-ubuntu\d+\.\d+$"
)
SLIM_PYTHON = re.compile(r"^python:(?P<version>3\.\d+\.\d+)-slim-[a-z]+$")


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str  # with global ARG defaults substituted
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, the way `docker build` reads the file."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comment lines vanish, even inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            parts = args.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: global_args[m.group(1) or m.group(2)], parts[0])
            assert len(parts) == 3 and parts[1].upper() == "AS", f"unnamed stage: FROM {args}"
            stages.append(Stage(name=parts[2], base=image))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    names = [s.name for s in stages]
    assert len(names) == len(set(names)), f"duplicate stage names: {names}"
    return global_args, {s.name: s for s in stages}


def test_parser_reads_continuations_comments_and_args() -> None:
    text = (
        "ARG BASE=python:3.11.11-slim-bookworm\n"
        "FROM ${BASE} AS one\n"
        "RUN a \\\n"
        "# a comment inside the continuation\n"
        "    && b\n"
        'ENTRYPOINT ["x", "y"]\n'
    )
    args, [stage] = parse_dockerfile(text)
    assert args == {"BASE": "python:3.11.11-slim-bookworm"}
    assert stage.base == "python:3.11.11-slim-bookworm"
    assert stage.all("RUN") == ["a  && b"]
    assert stage.all("ENTRYPOINT") == ['["x", "y"]']


def test_multi_stage_with_pinned_bases(parsed) -> None:
    _global_args, stages = parsed
    assert {"build", "operator", "trainer"} <= set(stages)
    for stage in stages.values():
        if stage.base in stages:  # FROM an earlier stage
            continue
        reference = stage.base.split("@")[0]
        repository, _, tag = reference.rpartition(":")
        assert repository and "/" not in tag, f"stage {stage.name}: base {stage.base} has no tag"
        assert tag != "latest", f"stage {stage.name}: base {stage.base} uses `latest`"
        assert re.search(r"\d+\.\d+", tag), f"stage {stage.name}: tag {tag} is not a version"
    code = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert ":latest" not in code


def test_operator_image(parsed) -> None:
    _global_args, stages = parsed
    operator = stages["operator"]
    match = SLIM_PYTHON.match(operator.base)
    assert match, f"operator base {operator.base} is not a slim Python image"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(match["version"])
    assert stages["build"].base == operator.base  # the wheel is built by the same Python

    runs = " ".join(operator.all("RUN"))
    assert "torch" not in runs.replace("find_spec('torch')", "")
    assert "[trainer]" not in runs and "[neuron]" not in runs
    assert "/wheels/llamajob-" in runs

    users = operator.all("USER")
    assert users, "operator image runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    if user.isdigit():
        assert int(user) >= 1000
        assert f"--uid {user}" in runs
    assert json.loads(operator.all("ENTRYPOINT")[-1]) == ["llamajob", "operator"]
    # The chart's probe and metrics ports.
    assert set(" ".join(operator.all("EXPOSE")).split()) == {"8080", "9090"}


def test_trainer_base_is_a_pinned_neuron_training_dlc(parsed) -> None:
    global_args, stages = parsed
    trainer = stages["trainer"]
    default = global_args["BASE_IMAGE"]
    assert trainer.base == default  # FROM ${BASE_IMAGE}
    match = NEURON_DLC.match(default)
    assert match, f"BASE_IMAGE {default} is not a pinned AWS Neuron PyTorch training DLC"
    py = f"{match['py'][0]}.{match['py'][1:]}.0"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(py), (
        f"the DLC's Python {py} does not satisfy requires-python"
    )


def trainer_install_commands(stage: Stage) -> list[list[str]]:
    commands = []
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;", run):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"]:
                commands.append(words[2:])
    return commands


def test_trainer_keeps_the_images_torch_and_neuron_packages(parsed) -> None:
    _, stages = parsed
    trainer = stages["trainer"]
    commands = trainer_install_commands(trainer)
    ours = [c for c in commands if any(w.startswith("/wheels/llamajob-") for w in c)]
    assert ours == [["--no-deps", "/wheels/llamajob-*.whl"]]

    deps = [c for c in commands if c not in ours]
    assert len(deps) == 1
    [command] = deps
    assert command[:2] == ["--constraint", "/tmp/neuron-constraints.txt"]
    installed = {canonicalize_name(Requirement(w).name): Requirement(w) for w in command[2:]}
    assert "torch" not in installed and not any("neuron" in name for name in installed)

    # The constraints are the image's own torch and Neuron packages.
    runs = " ".join(trainer.all("RUN"))
    assert "pip freeze" in runs and "> /tmp/neuron-constraints.txt" in runs
    for package in ("torch", "torch-neuronx", "neuronx-distributed", "neuronx-cc"):
        assert package in runs.split("grep", 1)[1].split(">", 1)[0]


def test_trainer_installs_exactly_the_light_dependencies(parsed) -> None:
    """Everything pyproject asks for (dependencies + `trainer` extra) except torch, with the same
    version ranges: a dependency added to pyproject breaks this test, not a training job."""
    _, stages = parsed
    [command] = [c for c in trainer_install_commands(stages["trainer"]) if "--constraint" in c]
    in_dockerfile = {canonicalize_name(Requirement(w).name): str(Requirement(w).specifier)
                     for w in command[2:]}
    wanted = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    wanted += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["trainer"]]
    expected = {canonicalize_name(r.name): str(r.specifier) for r in wanted
                if canonicalize_name(r.name) != "torch"}
    assert in_dockerfile == expected


def test_trainer_launchers_are_checked_at_build_time(parsed) -> None:
    _, stages = parsed
    runs = " ".join(stages["trainer"].all("RUN"))
    assert "command -v torchrun" in runs
    assert "command -v neuron_parallel_compile" in runs
    assert "llamajob --version" in runs


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # allow-list
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator", "trainer"}
    # What the build stage copies must be allowed in.
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    build = next(s for s in stages if s.name == "build")
    copied = {src.rstrip("/").lstrip("./") for args in build.all("COPY")
              for src in args.split()[:-1] if not src.startswith("--")}
    assert copied <= allowed


def test_install_doc_says_images_are_not_built_here() -> None:
    text = (ROOT / "docs" / "install.md").read_text()
    assert "No Docker engine" in text
    assert "--target operator" in text and "--target trainer" in text
