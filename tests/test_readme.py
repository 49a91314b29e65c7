"""Every command the README (and the planner's page) shows either runs here, with the output
shown, or is marked cluster-only and covered by the cluster-path tests.

Conventions in the docs:
- a ```sh block whose first line is ``# cluster-only`` needs a cluster (docker, helm, kubectl
  against EKS); tests/test_cluster_path.py follows those steps on the real control plane;
- any other ```sh block runs line by line here (``make`` lines excepted: CI is ``make test``, and
  ``make run`` is tests/test_local.py's end-to-end run of the same job);
- in a ```text block, ``$ command`` lines run here and the lines after them are the expected
  output (stdout, then stderr); a line ``  ...`` stands for any lines, and the others must then
  appear in that order.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, ROOT

DOCS = [ROOT / "README.md", ROOT / "docs" / "planner.md"]
CLUSTER_ONLY = "# cluster-only"
# What the cluster-only blocks may use: tools a laptop without a cluster cannot exercise.
CLUSTER_TOOLS = ("docker ", "helm ", "kubectl ")
ELLIPSIS = "  ..."
ENV = {"REGISTRY": "registry.example.com/ml", "HF_TOKEN": "hf_example"}


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    lines: list[str]

    @property
    def cluster_only(self) -> bool:
        return bool(self.lines) and self.lines[0].strip() == CLUSTER_ONLY


@dataclass
class Example:
    """One `$ command` of a text block and the output shown after it."""

    where: str
    command: str
    expected: list[str] = field(default_factory=list)


def blocks(doc: Path) -> list[Block]:
    found, current = [], None
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        stripped = line.strip()
        if current is None and stripped.startswith("```") and len(stripped) > 3:
            indent = len(line) - len(line.lstrip())
            current = Block(doc, number, stripped[3:], [])
            current_indent = indent
        elif current is not None and stripped == "```":
            found.append(current)
            current = None
        elif current is not None:
            current.lines.append(line[current_indent:])
    return found


def commands(block: Block) -> list[str]:
    """The shell commands of a sh block, continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for line in block.lines:
        text = re.sub(r"\s+#.*$", "", line).strip() if not line.lstrip().startswith("#") else ""
        if not text:
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        out.append(pending + text)
        pending = ""
    return out


def examples(block: Block) -> list[Example]:
    out: list[Example] = []
    for line in block.lines:
        if line.startswith("$ "):
            out.append(Example(f"{block.doc.name}:{block.line}", line[2:]))
        elif out:
            out[-1].expected.append(line)
    return out


def everything() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def runnable() -> list[tuple[str, str, list[str] | None]]:
    """(where, command, expected output or None) for everything that runs here."""
    cases: list[tuple[str, str, list[str] | None]] = []
    for block in everything():
        where = f"{block.doc.relative_to(ROOT)}:{block.line}"
        if block.lang == "sh" and not block.cluster_only:
            cases += [(where, c, None) for c in commands(block) if not c.startswith("make ")]
        elif block.lang == "text":
            cases += [(e.where, e.command, e.expected) for e in examples(block)]
    return cases


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the commands run: a scratch directory that sees the repository's examples, so a
    command that writes a file (the planner page's edited copy of an example) writes it here."""
    path = tmp_path_factory.mktemp("readme")
    (path / "examples").symlink_to(ROOT / "examples")
    return path


def run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **ENV, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def matches(actual: list[str], expected: list[str]) -> bool:
    expected = [e.rstrip() for e in expected]
    while expected and not expected[-1].strip():
        expected.pop()
    actual = [a.rstrip() for a in actual]
    if ELLIPSIS not in expected:
        return actual == expected
    it = iter(actual)
    return all(any(a == e for a in it) for e in expected if e != ELLIPSIS)


CASES = runnable()


@pytest.mark.parametrize(("where", "command", "expected"), CASES,
                         ids=[f"{w}:{c[:40]}" for w, c, _ in CASES])
def test_command_runs_as_shown(where: str, command: str, expected: list[str] | None,
                               workdir: Path) -> None:
    proc = run(command, workdir)
    output = (proc.stdout + proc.stderr).splitlines()
    if expected is None:
        assert proc.returncode == 0, f"{where}: `{command}` failed:\n{proc.stdout}{proc.stderr}"
        return
    # An example may show a refusal (exit 2, with the error); anything else must succeed.
    if not any(line.startswith("error:") for line in expected):
        assert proc.returncode == 0, f"{where}: `{command}` failed:\n{proc.stdout}{proc.stderr}"
    assert matches(output, expected), (
        f"{where}: `{command}` printed something else than the docs show:\n"
        + "\n".join(output))


def test_the_docs_show_commands_at_all() -> None:
    """The parser finds what it should: a wrong fence convention would make the test above
    vacuous."""
    assert len([c for c in CASES if c[2] is not None]) >= 6  # the planner's outputs
    assert any("llamajob render" in c for _, c, _ in CASES)
    assert any(b.cluster_only for b in everything())


def test_cluster_only_blocks_use_only_cluster_tools() -> None:
    """A block marked cluster-only holds only what needs a cluster (or an image build): the
    steps a laptop could run must not hide there."""
    for block in everything():
        if not block.cluster_only:
            continue
        for command in commands(block):
            assert command.startswith(CLUSTER_TOOLS), (
                f"{block.doc.name}:{block.line}: `{command}` is marked cluster-only but needs "
                "no cluster; move it to a block that runs in the tests")
