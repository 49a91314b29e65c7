"""Read a LlamaTrainingJob from YAML or a dict, turning every problem into (field, message).

Used by the CLI (`plan`, `run`, `render`) and by the operator on objects from the API, so a bad
job reads the same everywhere: one line per problem, the field path first, no traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api import API_VERSION, KIND, LlamaTrainingJob


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
        return "unknown field (check the spelling; fields are camelCase)"
    if kind == "missing":
        return "required field is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input")
    if kind not in {"model_type", "dict_type"} and not isinstance(given, dict | list):
        msg += f" (got {given!r})"
    return msg


def errors_from_validation(exc: ValidationError) -> list[SpecError]:
    seen: dict[str, SpecError] = {}
    for err in exc.errors():
        field = _path(tuple(err["loc"]))
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
        return LlamaTrainingJob.model_validate(clean)
    except ValidationError as exc:
        raise JobFileError(errors_from_validation(exc)) from None


def load_job(path: str | Path) -> LlamaTrainingJob:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise JobFileError([SpecError("", f"cannot read {p}: {exc.strerror}")]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        pos = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobFileError([SpecError("", f"{p}: malformed YAML{pos}: {problem}")]) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(docs) == 1 or not jobs:
        return parse_job(docs[0] if docs else None)
    return parse_job(jobs[0])
