"""Tokenizers for `prepare-data`: a Hugging Face `tokenizer.json` or a built-in byte-level one.

The byte-level tokenizer needs no file and no download: ids 0-255 are the UTF-8 bytes, then BOS,
EOS and PAD. Its 259 ids fit the `tiny` preset's vocabulary of 512.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import ConfigError

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
            "fix the path, or leave it unset for the built-in byte-level tokenizer."
        )
    return HFTokenizer(path)
