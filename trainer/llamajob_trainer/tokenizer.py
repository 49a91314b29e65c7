"""Tokenizers for `prepare-data`: a Hugging Face `tokenizer.json` or a built-in byte-level one.

The byte-level tokenizer needs no file and no download: ids 0-255 are the UTF-8 bytes, then BOS,
EOS and PAD. Its 259 ids fit the `tiny` preset's vocabulary of 512.

`prepare-data --tokenizer ORG/NAME` also takes a Hugging Face Hub model repository: its
tokenizer.json (and tokenizer_config.json, which names the EOS token) are downloaded with
`huggingface_hub` (a dependency of `tokenizers`, imported only then), authenticated by $HF_TOKEN
for gated models such as meta-llama/Meta-Llama-3-8B.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import ConfigError, DependencyError

BYTE_TOKENIZER = "byte"

# End-of-document tokens of common tokenizer families, most specific first. Used when no
# tokenizer_config.json beside the tokenizer.json names the EOS token.
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|eot_id|>")


class Tokenizer(Protocol):
    @property
    def identity(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids, plus three special tokens after them."""

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    @property
    def identity(self) -> str:
        return "byte-level-v1"

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer loaded from a tokenizer.json file."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok  # imported here: only this class needs it

        try:
            raw = path.read_bytes()
            self._tok = _Tok.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises bare Exception for a malformed file
            raise ConfigError(
                f"model.tokenizer: cannot read tokenizer {path}: {exc}. Point it at a Hugging "
                "Face tokenizer.json (or leave it unset for the built-in byte-level tokenizer)."
            ) from exc
        self.path = path
        self._identity = "hf:" + hashlib.sha256(raw).hexdigest()[:16]
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._eos_id = self._find_eos(path)

    def _find_eos(self, path: Path) -> int:
        names: list[str] = []
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                eos = json.loads(config.read_text()).get("eos_token")
            except (OSError, ValueError):
                eos = None
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                names.append(eos)
        names.extend(_EOS_CANDIDATES)
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ConfigError(
            f"model.tokenizer: {path} has no end-of-text token (looked for {', '.join(names)}); "
            "add one, or name it as eos_token in a tokenizer_config.json beside it."
        )

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(spec: str | None) -> Tokenizer:
    """None or "byte": the built-in tokenizer; else a tokenizer.json (or a directory with one)."""
    if spec is None or spec == BYTE_TOKENIZER:
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"model.tokenizer: {spec} is not a tokenizer.json file (or a directory holding one); "
            "fix the path, download one with `llamajob prepare-data --tokenizer ORG/NAME "
            "--save-tokenizer PATH` (see docs/data.md), or leave it unset for the built-in "
            "byte-level tokenizer."
        )
    return HFTokenizer(path)


# --- Hugging Face Hub --------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # the second is optional
# A Hub repo id: ORG/NAME (names: letters, digits, '-', '_', '.'; no '--' or '..', no leading
# or trailing '-' or '.').
_REPO_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?")

# (repo_id, filename, token) -> local path of the downloaded file; raises on failure.
DownloadFn = Callable[[str, str, "str | None"], str]


def is_hub_repo_id(spec: str | None) -> bool:
    """True for ORG/NAME that is not an existing local path (a local file or directory wins)."""
    if not spec or not _REPO_ID.fullmatch(spec) or ".." in spec or "--" in spec:
        return False
    return not Path(spec).exists() and not spec.endswith(".json")


def _hub_download(repo_id: str, filename: str, token: str | None) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise DependencyError(
            f"--tokenizer {repo_id}: downloading from the Hugging Face Hub needs huggingface_hub "
            "(pip install huggingface_hub); or download tokenizer.json yourself and pass its path"
        ) from exc
    return str(hf_hub_download(repo_id, filename, token=token))


def _hub_error_kind(exc: BaseException) -> str | None:
    names = {cls.__name__ for cls in type(exc).__mro__}
    for kind in ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError",
                 "EntryNotFoundError", "LocalEntryNotFoundError"):
        if kind in names:
            return kind
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return "Unauthorized" if status in {401, 403} else None


def download_hub_tokenizer(
    repo_id: str, token: str | None = None, download: DownloadFn | None = None
) -> Path:
    """Download a Hub model's tokenizer.json (and tokenizer_config.json if it has one); return
    the directory holding them. `token` defaults to $HF_TOKEN (gated models need it)."""
    fetch = download or _hub_download
    token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
    got: dict[str, Path] = {}
    for name in TOKENIZER_FILES:
        try:
            got[name] = Path(fetch(repo_id, name, token))
        except DependencyError:
            raise
        except Exception as exc:
            kind = _hub_error_kind(exc)
            if name != "tokenizer.json" and kind in {"EntryNotFoundError", None}:
                continue  # tokenizer_config.json is optional; the EOS token has defaults
            if kind in {"GatedRepoError", "Unauthorized"} or (kind and not token):
                raise ConfigError(
                    f"--tokenizer {repo_id}: the Hugging Face Hub refused the download "
                    f"({type(exc).__name__}). For a gated model accept its license on "
                    f"https://huggingface.co/{repo_id} and set HF_TOKEN to a token of that "
                    f"account{'' if token else ' (HF_TOKEN is not set)'}"
                ) from exc
            if kind in {"RepositoryNotFoundError", "RevisionNotFoundError"}:
                raise ConfigError(
                    f"--tokenizer {repo_id}: no such model repository on the Hugging Face Hub "
                    "(or it is private and HF_TOKEN cannot read it); check the repo id"
                ) from exc
            if kind == "EntryNotFoundError":
                raise ConfigError(
                    f"--tokenizer {repo_id}: the repository has no tokenizer.json (only "
                    "tokenizers in the Hugging Face `tokenizers` format are supported)"
                ) from exc
            raise  # network trouble and the like: transient, a retry may work
    # hf_hub_download returns snapshot paths: both files sit in the same revision directory.
    directory = got["tokenizer.json"].parent
    config = got.get("tokenizer_config.json")
    if config is not None and config.parent != directory:
        shutil.copyfile(config, directory / "tokenizer_config.json")
    return directory


def install_tokenizer(source_dir: Path, target: str | Path) -> Path:
    """Copy tokenizer.json (and tokenizer_config.json) from `source_dir` to `target` (a
    tokenizer.json path, or a directory); return the tokenizer.json path. A different file
    already there is refused: a dataset is bound to its tokenizer's exact bytes."""
    dest = Path(target)
    if dest.is_dir() or dest.suffix != ".json":
        dest = dest / "tokenizer.json"
    pairs = [(source_dir / "tokenizer.json", dest)]
    config = source_dir / "tokenizer_config.json"
    if config.is_file():
        pairs.append((config, dest.parent / "tokenizer_config.json"))
    for src, dst in pairs:
        if dst.exists() and dst.read_bytes() != src.read_bytes():
            raise ConfigError(
                f"model.tokenizer: {dst} exists and differs from the downloaded {src.name}; "
                "datasets and checkpoints made with it would no longer match. Remove it, or "
                "point model.tokenizer (or --save-tokenizer) elsewhere"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in pairs:
        if not dst.exists():
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    return dest
