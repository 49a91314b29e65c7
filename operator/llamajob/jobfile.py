"""Read a LlamaTrainingJob from YAML or a dict, turning every problem into (field, message).

Used by the CLI (`plan`, `run`, `render`) and by the operator on objects from the API, so a bad
job reads the same everywhere: one line per problem, the field path first, no traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from llamajob_trainer.config import FieldValueError
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from .api import API_VERSION, KIND, LlamaTrainingJob

# Nesting a job needs: spec.cluster.tolerations[0].key is five levels. PyYAML composes nodes
# recursively, so a deeper document would otherwise end in a RecursionError.
MAX_YAML_DEPTH = 100
_SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+")


@dataclass(frozen=True)
class SpecError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class JobFileError(Exception):
    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # pydantic adds the union member tag (e.g. 'int', 'literal[...]') to the location.
            if part in {"int", "str", "float", "bool"} or str(part).startswith(
                ("literal[", "constrained-", "function-")
            ):
                continue
            out += f".{part}" if out else str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        key = str(err["loc"][-1]) if err.get("loc") else ""
        if _SNAKE.fullmatch(key):
            # Kubernetes would prune the snake_case spelling and the job would silently run
            # with the default, so it is refused here as well.
            return f"unknown field: fields are camelCase; use {to_camel(key)}"
        return "unknown field (check the spelling; fields are camelCase)"
    if kind == "missing":
        return "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input")
    if kind not in {"model_type", "dict_type"} and not isinstance(given, dict | list):
        shown = repr(given)
        msg += f" (got {shown[:60]}...)" if len(shown) > 80 else f" (got {shown})"
    return msg


def _blamed(err: dict[str, Any]) -> tuple[Any, ...]:
    """The error's location, with the field a model-level check names (FieldValueError)."""
    loc = tuple(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldValueError):
        for part in re.findall(r"[^.\[\]]+|\[\d+\]", cause.field):
            loc += (int(part[1:-1]),) if part.startswith("[") else (part,)
    return loc


def errors_from_validation(exc: ValidationError) -> list[SpecError]:
    seen: dict[str, SpecError] = {}
    for err in exc.errors():
        field = _path(_blamed(dict(err)))
        # A failed union (e.g. resume: int | "latestIfExists" | "none") reports once per member;
        # one line per field is what a person wants to read.
        if field in seen:
            continue
        seen[field] = SpecError(field, _message(dict(err)))
    return list(seen.values())


def parse_job(obj: Any) -> LlamaTrainingJob:
    """Validate a decoded object; raises JobFileError with one entry per problem."""
    if not isinstance(obj, dict):
        raise JobFileError([SpecError("", "expected a mapping (a LlamaTrainingJob object)")])
    problems: list[SpecError] = []
    if obj.get("apiVersion") != API_VERSION:
        problems.append(
            SpecError("apiVersion", f"must be {API_VERSION} (got {obj.get('apiVersion')!r})")
        )
    if obj.get("kind") != KIND:
        problems.append(SpecError("kind", f"must be {KIND} (got {obj.get('kind')!r})"))
    if problems:
        raise JobFileError(problems)
    clean = {k: v for k, v in obj.items() if k in {"apiVersion", "kind", "metadata", "spec"}}
    try:
        # by_name=False: only the camelCase spelling, as the CRD. Python code constructing
        # models by field name is unaffected.
        return LlamaTrainingJob.model_validate(clean, by_name=False)
    except ValidationError as exc:
        raise JobFileError(errors_from_validation(exc)) from None
    except RecursionError:
        raise JobFileError([SpecError("", "the object is nested too deeply")]) from None


class _JobYAMLError(yaml.MarkedYAMLError):
    """A YAML file that parses but would be read wrongly: reported with its line."""


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML forbids them; PyYAML keeps the last) and
    nesting deeper than any job needs."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _JobYAMLError(
                    problem=f"nested more than {MAX_YAML_DEPTH} levels deep; a "
                    "LlamaTrainingJob needs fewer than ten",
                    problem_mark=self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges are meant to be overridden
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first.setdefault(key, line)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it
                if earlier != line:
                    raise _JobYAMLError(
                        problem=f"duplicate key {key!r} (first at line {earlier}); YAML keeps "
                        "only the last one, so remove one of them",
                        problem_mark=key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _documents(text: str) -> list[tuple[int, Any]]:
    """(line, value) of each non-empty YAML document."""
    loader = _JobLoader(text)
    docs: list[tuple[int, Any]] = []
    try:
        while loader.check_data():
            line = loader.peek_event().start_mark.line + 1
            value = loader.get_data()
            if value is not None:
                docs.append((line, value))
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]
    return docs


def load_job(path: str | Path) -> LlamaTrainingJob:
    """Read one LlamaTrainingJob from a YAML file; raises JobFileError."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise JobFileError([SpecError("", f"cannot read {p}: {reason}")]) from None
    try:
        docs = _documents(text)
    except _JobYAMLError as exc:
        where = exc.problem_mark
        pos = f" line {where.line + 1}" if where else ""
        raise JobFileError([SpecError("", f"{p}{pos}: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        pos = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobFileError([SpecError("", f"{p}: malformed YAML{pos}: {problem}")]) from None
    except RecursionError:
        raise JobFileError([SpecError("", f"{p}: nested too deeply to read")]) from None
    if len(docs) > 1:
        # `kubectl apply -f` would create every document while this reads one: refused rather
        # than ignored, so that what runs locally is what the file says.
        raise JobFileError(
            [
                SpecError(
                    "",
                    f"{p} line {docs[1][0]}: a second YAML document; put one LlamaTrainingJob "
                    "in each file",
                )
            ]
        )
    return parse_job(docs[0][1] if docs else None)
