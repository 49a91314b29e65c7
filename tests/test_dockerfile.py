"""The Dockerfile's structure. No Docker engine runs here, so the images are never built in
these tests: they read the file as Docker's parser would (continuations joined, comments
dropped, ARG defaults substituted into FROM and, for the checks, into each stage's instructions)
and check what can be checked without building: the targets, their pinned bases and torch
stacks, what each installs and how, and the entrypoints. The build itself asserts the rest
(launchers present, package versions, no torch in the operator image).
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
    r"^(public\.ecr\.aws/neuron|763104351884\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com)"
    r"/pytorch-training-neuronx:"
    r"(?P<torch>\d+\.\d+\.\d+)-neuronx-py(?P<py>3\d+)-sdk(?P<sdk>\d+\.\d+\.\d+)-ubuntu\d+\.\d+$"
)
SLIM_PYTHON = re.compile(r"^python:(?P<version>3\.\d+\.\d+)-slim-[a-z]+$")
UBUNTU = re.compile(r"^(public\.ecr\.aws/docker/library/)?ubuntu:(?P<version>\d+\.\d+)$")
# Python of each Ubuntu LTS (what `python3` and `python3-venv` install there).
UBUNTU_PYTHON = {"22.04": "3.10.0", "24.04": "3.12.0", "26.04": "3.14.0"}
TRAINERS = ("trainer-trn1", "trainer-neuron", "trainer-cuda")
NEURON_PIP_REPOSITORY = "https://pip.repos.neuron.amazonaws.com"


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
    assert {"build", "operator", *TRAINERS} <= set(stages)
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


def expand(text: str, args: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced by the build's ARG values (unknown names stay)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def stage_runs(stage: Stage, global_args: dict[str, str]) -> str:
    return expand(" ".join(stage.all("RUN")), global_args)


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a shell line, as the shell splits them: quoted text (a
    `python -c "a; b"`) stays one word, unquoted `&&`, `;`, `|` and redirections separate."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("&;|<>()"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def install_commands(stage: Stage, global_args: dict[str, str]) -> list[list[str]]:
    """The argument lists of every `pip install` in the stage, ARG values substituted."""
    return [words[2:] for run in stage.all("RUN")
            for words in shell_commands(expand(run, global_args))
            if words[:2] == ["pip", "install"]]


def requirements(words: list[str]) -> dict[str, Requirement]:
    """The requirement arguments of a pip command (options and their values left out)."""
    out: dict[str, Requirement] = {}
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("--constraint", "--extra-index-url", "--index-url", "-c"):
            skip = True
        elif not word.startswith("-") and not word.startswith("/"):
            req = Requirement(word)
            out[canonicalize_name(req.name)] = req
    return out


def pinned(req: Requirement) -> str:
    """The exact version of a `==` pin (the test fails on anything looser)."""
    [spec] = list(req.specifier)
    assert spec.operator == "==" and "*" not in spec.version, f"{req} is not an exact pin"
    return spec.version


def pyproject_torch() -> str:
    [torch] = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["trainer"]
               if canonicalize_name(Requirement(r).name) == "torch"]
    return pinned(torch)


def test_every_trainer_target_exists(parsed) -> None:
    _, stages = parsed
    assert set(TRAINERS) <= set(stages)
    # The old single `trainer` target is gone: its name would not say which stack it holds.
    assert "trainer" not in stages


def test_stage_args_are_declared_where_they_are_used(parsed) -> None:
    """Docker passes a global ARG into a stage only if the stage declares it again; an
    undeclared ${NAME} in a RUN silently becomes empty (`torch==` would install any torch)."""
    global_args, stages = parsed
    for stage in stages.values():
        declared = {a.split("=")[0] for a in stage.all("ARG")}
        for keyword in ("RUN", "ENV", "LABEL"):
            for text in stage.all(keyword):
                for name in re.findall(r"\$\{(\w+)\}", text):
                    if name in global_args:
                        assert name in declared, f"stage {stage.name}: {name} not declared"


def test_trn1_trainer_is_the_pinned_neuron_228_dlc(parsed) -> None:
    global_args, stages = parsed
    trainer = stages["trainer-trn1"]
    default = global_args["TRN1_BASE_IMAGE"]
    assert trainer.base == default  # FROM ${TRN1_BASE_IMAGE}
    match = NEURON_DLC.match(default)
    assert match, f"TRN1_BASE_IMAGE {default} is not a pinned AWS Neuron PyTorch training DLC"
    # NxD stays on Neuron 2.28 with torch 2.9 (the last PyTorch/XLA training stack).
    assert match["torch"] == "2.9.0"
    assert match["sdk"].startswith("2.28.")
    py = f"{match['py'][0]}.{match['py'][1:]}.0"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(py), (
        f"the DLC's Python {py} does not satisfy requires-python"
    )


def test_trn1_trainer_keeps_the_images_torch_xla_stack(parsed) -> None:
    global_args, stages = parsed
    trainer = stages["trainer-trn1"]
    commands = install_commands(trainer, global_args)
    # Nothing but our wheel and the light dependencies: the DLC's stack is not reinstalled.
    for command in commands:
        installed = requirements(command)
        assert "torch" not in installed and not any("neuron" in n for n in installed)
    frozen = stage_runs(trainer, global_args).split("grep", 1)[1].split(">", 1)[0]
    for package in ("torch", "torch[-_]xla", "torch[-_]neuronx", "neuronx[-_]distributed",
                    "neuronx[-_]cc"):
        assert package in frozen
    runs = stage_runs(trainer, global_args)
    assert "v('torch')" in runs and "startswith('2.9.')" in runs


def test_neuron_trainer_is_torchneuron_matching_the_trainers_torch(parsed) -> None:
    global_args, stages = parsed
    trainer = stages["trainer-neuron"]
    match = UBUNTU.match(trainer.base)
    assert match, f"trainer-neuron base {trainer.base} is not a pinned Ubuntu"
    assert match["version"] == "24.04"  # the Ubuntu TorchNeuron 2.33 supports with Python 3.12
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(
        UBUNTU_PYTHON[match["version"]])
    assert tuple(int(x) for x in global_args["NEURON_SDK_VERSION"].split(".")) >= (2, 33, 0)

    [stack] = [c for c in install_commands(trainer, global_args)
               if "torch" in requirements(c) and "--constraint" not in c]
    installed = requirements(stack)
    assert set(installed) == {"torch", "torch-neuronx", "neuronx-cc", "nki"}
    torch_version = pinned(installed["torch"])
    assert torch_version == pyproject_torch()
    # AWS: install the torch-neuronx family that matches the PyTorch version (2.13.x for 2.13).
    neuronx = pinned(installed["torch-neuronx"])
    assert neuronx.split(".")[:2] == torch_version.split(".")[:2]
    pinned(installed["neuronx-cc"])
    pinned(installed["nki"])
    # From the Neuron pip repository, torch from PyTorch's CPU index (no CUDA libraries here).
    options = " ".join(stack)
    assert f"--extra-index-url {NEURON_PIP_REPOSITORY}" in options
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in options
    # The torch-xla path stays in the trn1 image.
    runs = stage_runs(trainer, global_args)
    assert "neuronx-distributed" not in runs and "neuronx_distributed" not in runs
    assert "neuron_parallel_compile" not in runs
    # Runtime, collectives and EFA at pinned versions.
    for package, arg in (("aws-neuronx-runtime-lib", "NEURON_RUNTIME_VERSION"),
                         ("aws-neuronx-collectives", "NEURON_COLLECTIVES_VERSION")):
        assert f'"{package}={global_args[arg]}*"' in runs
    assert f"aws-efa-installer-{global_args['EFA_INSTALLER_VERSION']}.tar.gz" in runs
    assert "--skip-kmod" in runs  # the host owns the EFA kernel module
    assert "command -v neuronx-cc" in runs


def test_cuda_trainer_is_pypis_cuda_torch_with_nccl_over_efa(parsed) -> None:
    global_args, stages = parsed
    trainer = stages["trainer-cuda"]
    assert UBUNTU.match(trainer.base), f"trainer-cuda base {trainer.base} is not a pinned Ubuntu"
    [stack] = [c for c in install_commands(trainer, global_args)
               if "torch" in requirements(c) and "--constraint" not in c]
    installed = requirements(stack)
    assert set(installed) == {"torch"}
    assert pinned(installed["torch"]) == pyproject_torch()
    # PyPI's wheel is the CUDA build; a CPU index here would silently give a CPU-only image.
    assert "--index-url" not in stack and "--extra-index-url" not in stack
    runs = stage_runs(trainer, global_args)
    assert "torch.version.cuda" in runs
    assert f"aws-efa-installer-{global_args['EFA_INSTALLER_VERSION']}.tar.gz" in runs
    assert "--skip-kmod" in runs
    env = " ".join(trainer.all("ENV"))
    assert "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu" in env  # NCCL finds aws-ofi-nccl there
    assert "neuron" not in runs


@pytest.mark.parametrize("target", TRAINERS)
def test_trainer_installs_our_wheel_without_deps_under_frozen_constraints(
    parsed, target: str
) -> None:
    global_args, stages = parsed
    stage = stages[target]
    commands = install_commands(stage, global_args)
    ours = [c for c in commands if any(w.startswith("/wheels/llamajob-") for w in c)]
    assert ours == [["--no-deps", "/wheels/llamajob-*.whl"]]
    constrained = [c for c in commands if "--constraint" in c]
    assert len(constrained) == 1
    [command] = constrained
    assert command[:2] == ["--constraint", "/tmp/torch-constraints.txt"]
    installed = requirements(command)
    assert "torch" not in installed and not any("neuron" in name for name in installed)
    # The constraints are the image's own torch stack, frozen before our package goes in.
    runs = stage_runs(stage, global_args)
    assert "pip freeze" in runs and "> /tmp/torch-constraints.txt" in runs
    assert runs.index("pip freeze") < runs.index("/wheels/llamajob-")
    assert "torch" in runs.split("grep", 1)[1].split(">", 1)[0]


@pytest.mark.parametrize("target", TRAINERS)
def test_trainer_installs_exactly_the_light_dependencies(parsed, target: str) -> None:
    """Everything pyproject asks for (dependencies + `trainer` extra) except torch, with the same
    version ranges: a dependency added to pyproject breaks this test, not a training job."""
    global_args, stages = parsed
    [command] = [c for c in install_commands(stages[target], global_args) if "--constraint" in c]
    in_dockerfile = {name: str(req.specifier) for name, req in requirements(command).items()}
    wanted = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    wanted += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["trainer"]]
    expected = {canonicalize_name(r.name): str(r.specifier) for r in wanted
                if canonicalize_name(r.name) != "torch"}
    assert in_dockerfile == expected


@pytest.mark.parametrize("target", TRAINERS)
def test_trainer_launchers_are_checked_at_build_time(parsed, target: str) -> None:
    global_args, stages = parsed
    runs = stage_runs(stages[target], global_args)
    assert "command -v torchrun" in runs
    assert "llamajob --version" in runs
    assert ("command -v neuron_parallel_compile" in runs) == (target == "trainer-trn1")


def test_entrypoints(parsed) -> None:
    """The operator image runs the operator; no trainer sets one, since the operator's pods give
    the whole command (torchrun ...), which replaces any entrypoint."""
    _, stages = parsed
    assert json.loads(stages["operator"].all("ENTRYPOINT")[-1]) == ["llamajob", "operator"]
    for target in TRAINERS:
        assert stages[target].all("ENTRYPOINT") == [], target
        assert stages[target].all("WORKDIR")[-1] == "/workspace"


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


def test_install_doc_names_every_target_and_says_images_are_not_built_here() -> None:
    text = (ROOT / "docs" / "install.md").read_text()
    assert "No Docker engine" in text
    for target in ("operator", *TRAINERS):
        assert f"--target {target} " in text, target
