"""Tokenized, packed datasets: writing them (`llamajob prepare-data`) and reading them in order.

On disk a dataset is a directory with two files:
- `tokens.bin`: rows of `seq_length + 1` token ids (input plus the label shifted by one), as
  little-endian uint16 (vocabularies up to 65,536) or uint32, memory-mapped when training.
  Documents are concatenated with EOS after each one and cut into rows; consecutive rows overlap
  by one token so that every token but the very first is a label exactly once.
- `metadata.json`: tokenizer identity and vocabulary size, seq_length, num_sequences, dtype, the
  sources and the SHA-256 of tokens.bin. It is written last: a directory without it is not a
  dataset (an interrupted prepare-data never looks complete).

Reading order is decided by a pure function of (seed, consumed samples): epoch e is a seeded
permutation of all rows; step after step the global batch takes the next `global_batch_size`
positions of that endless sequence of epochs, and data-parallel rank r takes its contiguous share,
cut into micro-batches. The only state is the number of consumed samples, which checkpoints save.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError
from .tokenizer import Tokenizer

BUILTIN_PYDOC = "builtin:pydoc"
TOKENS_FILE = "tokens.bin"
METADATA_FILE = "metadata.json"
FORMAT = "llamajob-packed-v1"
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst"})
DATA_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}


# --- reading sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input: a text file, a .jsonl/.parquet file with a "text" field, or the builtin corpus."""

    name: str
    size_bytes: int


def resolve_sources(inputs: Iterable[str]) -> list[Source]:
    """Expand directories (recursively, sorted) and check that every input exists."""
    sources: list[Source] = []
    for item in inputs:
        if item == BUILTIN_PYDOC:
            sources.append(Source(item, sum(len(t.encode()) for t in _pydoc_topics().values())))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
            if not files:
                raise DataError(
                    f"input directory {item} holds no {', '.join(sorted(DATA_SUFFIXES))} files"
                )
            sources.extend(Source(str(p), p.stat().st_size) for p in files)
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise DataError(
                    f"input {item}: unsupported file type {path.suffix or '(none)'}; use text "
                    '(.txt/.md/.rst), .jsonl with a "text" field or .parquet with a "text" '
                    "column"
                )
            sources.append(Source(str(path), path.stat().st_size))
        else:
            raise DataError(f"input {item} does not exist")
    return sources


def _pydoc_topics() -> dict[str, str]:
    # The English help topics shipped with every CPython install: real prose, no download.
    from pydoc_data.topics import topics

    return topics


def iter_documents(source: Source) -> Iterator[str]:
    """The documents of one source, in a fixed order."""
    if source.name == BUILTIN_PYDOC:
        topics = _pydoc_topics()
        for key in sorted(topics):
            yield topics[key]
        return
    path = Path(source.name)
    if path.suffix in TEXT_SUFFIXES:
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"input {path}: cannot read as UTF-8 text: {exc}") from exc
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)


def _iter_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"input {path}:{lineno}: not valid JSON: {exc}") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'input {path}:{lineno}: each line needs a string field "text"')
            yield text


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"input {path}: cannot read as parquet: {exc}") from exc
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f'input {path}: no column "text" (columns: {parquet.schema_arrow.names})')
    for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


# --- packing (pure) ----------------------------------------------------------------------------


class Packer:
    """Concatenates documents (EOS after each) and cuts rows of seq_length + 1 tokens."""

    def __init__(self, seq_length: int, eos_id: int) -> None:
        self.row = seq_length + 1
        self.stride = seq_length
        self.eos_id = eos_id
        self._buffer: list[int] = []

    def add(self, tokens: list[int]) -> list[list[int]]:
        self._buffer.extend(tokens)
        self._buffer.append(self.eos_id)
        rows: list[list[int]] = []
        start = 0
        while len(self._buffer) - start >= self.row:
            rows.append(self._buffer[start : start + self.row])
            start += self.stride
        if start:
            del self._buffer[:start]
        return rows

    @property
    def leftover(self) -> int:
        """Tokens at the end that do not fill a row (dropped)."""
        return len(self._buffer)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


# --- writing ---------------------------------------------------------------------------------


ProgressFn = Callable[[int], None]


def prepare_data(
    inputs: Iterable[str],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    seq_length: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize and pack `inputs` into `out_dir`; return the metadata written."""
    sources = resolve_sources(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / METADATA_FILE
    # Invalidate an older dataset first so a crash below never leaves new tokens with old metadata.
    meta_path.unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_bin = out / (TOKENS_FILE + ".tmp")
    sha = hashlib.sha256()
    packer = Packer(seq_length, tokenizer.eos_id)
    num_rows = documents = 0
    total = sum(s.size_bytes for s in sources)
    with tmp_bin.open("wb") as handle, _progress(total, progress, out.name) as advance:
        for source in sources:
            for text in iter_documents(source):
                documents += 1
                rows = packer.add(tokenizer.encode(text))
                if rows:
                    data = np.asarray(rows, dtype=dtype).tobytes()
                    handle.write(data)
                    sha.update(data)
                    num_rows += len(rows)
                advance(len(text.encode("utf-8", errors="replace")))
        handle.flush()
        os.fsync(handle.fileno())
    if num_rows == 0:
        tmp_bin.unlink()
        raise DataError(
            f"the inputs hold too little text for one sequence of {seq_length + 1} tokens; "
            "add text or lower --seq-length"
        )
    os.replace(tmp_bin, out / TOKENS_FILE)
    meta = {
        "format": FORMAT,
        "tokenizer": {
            "identity": tokenizer.identity,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        "seq_length": seq_length,
        "row_length": seq_length + 1,
        "num_sequences": num_rows,
        "num_tokens": num_rows * seq_length + 1,
        "documents": documents,
        "dropped_tail_tokens": packer.leftover,
        "dtype": dtype.name,
        "file": TOKENS_FILE,
        "sha256": sha.hexdigest(),
        "sources": [s.name for s in sources],
    }
    tmp_meta = out / (METADATA_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, meta_path)
    return meta


class _progress:
    """A rich progress bar over input bytes, or nothing when disabled."""

    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.total, self.enabled, self.label = total, enabled, label
        self._bar: Any = None

    def __enter__(self) -> ProgressFn:
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn(f"tokenizing into {self.label}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
        )
        self._bar.start()
        task = self._bar.add_task("tokenize", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


# --- reading ---------------------------------------------------------------------------------


class PackedDataset:
    """Read-only, memory-mapped rows of a prepared dataset."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.seq_length = int(self.metadata["seq_length"])
        self.row_length = self.seq_length + 1
        self.num_sequences = int(self.metadata["num_sequences"])
        dtype = np.dtype(self.metadata["dtype"]).newbyteorder("<")
        bin_path = self.path / self.metadata.get("file", TOKENS_FILE)
        expected = self.num_sequences * self.row_length * dtype.itemsize
        try:
            actual = bin_path.stat().st_size
        except OSError as exc:
            raise DataError(
                f"data.path: {bin_path} is missing; rerun llamajob prepare-data"
            ) from exc
        if actual != expected:
            raise DataError(
                f"data.path: {bin_path} has {actual} bytes but its metadata promises {expected}; "
                "the dataset is damaged, rerun llamajob prepare-data"
            )
        self._rows = np.memmap(bin_path, dtype=dtype, mode="r").reshape(
            self.num_sequences, self.row_length
        )

    def __len__(self) -> int:
        return self.num_sequences

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows as int64 (what embedding lookups take), shape (len(indices), seq_length + 1)."""
        return np.asarray(self._rows[np.asarray(indices)], dtype=np.int64)


def read_metadata(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    if not root.is_dir():
        raise DataError(
            f"data.path: dataset directory {root} does not exist; create it with "
            f"`llamajob prepare-data --output {root}` (on the shared file system in a cluster)"
        )
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise DataError(
            f"data.path: {root} has no {METADATA_FILE}, so it is not a complete dataset; "
            "(re)run llamajob prepare-data into it"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"data.path: cannot read {meta_path}: {exc}") from exc
    missing = [k for k in ("seq_length", "num_sequences", "dtype", "tokenizer") if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise DataError(
            f"data.path: {meta_path} is not llamajob dataset metadata (format {FORMAT}); "
            "rerun llamajob prepare-data"
        )
    return meta


def check_compatible(
    meta: dict[str, Any],
    *,
    seq_length: int,
    vocab_size: int,
    global_batch_size: int,
    tokenizer_identity: str | None,
    held_out: int = 0,
) -> None:
    """Raise a clear error when a dataset cannot feed this job. Pure."""
    if int(meta["seq_length"]) != seq_length:
        raise ConfigError(
            f"data.seqLength is {seq_length} but the dataset was packed with seq_length "
            f"{meta['seq_length']}; set data.seqLength: {meta['seq_length']} or rerun "
            f"llamajob prepare-data --seq-length {seq_length}"
        )
    data_vocab = int(meta["tokenizer"]["vocab_size"])
    if data_vocab > vocab_size:
        raise ConfigError(
            f"the dataset's tokenizer has {data_vocab} ids but the model's vocabulary is "
            f"{vocab_size}; set model.vocabSize >= {data_vocab} or use a smaller tokenizer"
        )
    if tokenizer_identity is not None and meta["tokenizer"]["identity"] != tokenizer_identity:
        raise ConfigError(
            f"model.tokenizer ({tokenizer_identity}) is not the tokenizer the dataset was "
            f"prepared with ({meta['tokenizer']['identity']}); rerun llamajob prepare-data "
            "with this tokenizer or point model.tokenizer at the original one"
        )
    if int(meta["num_sequences"]) < global_batch_size + held_out:
        if held_out:
            raise DataError(
                f"the dataset holds {meta['num_sequences']} sequences: validation.sequences "
                f"({held_out}) leaves fewer than one global batch ({global_batch_size}) to "
                "train on; lower validation.sequences or add data"
            )
        raise DataError(
            f"the dataset holds {meta['num_sequences']} sequences, fewer than one global batch "
            f"({global_batch_size}); add data or lower batch.globalBatchSize"
        )


# --- order (pure) ------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation seeded by (seed, epoch) only."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_sequences)
    perm.flags.writeable = False
    return perm


def global_batch_indices(
    num_sequences: int, seed: int, consumed_samples: int, global_batch_size: int
) -> np.ndarray:
    """Row indices of the global batch that starts after `consumed_samples` samples."""
    positions = np.arange(consumed_samples, consumed_samples + global_batch_size)
    epochs = positions // num_sequences
    out = np.empty(global_batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = epoch_permutation(num_sequences, seed, int(epoch))[
            positions[mask] % num_sequences
        ]
    return out


def rank_micro_batches(
    global_indices: np.ndarray, dp_rank: int, dp_size: int, micro_batch_size: int
) -> list[np.ndarray]:
    """Data-parallel rank `dp_rank`'s contiguous share of a global batch, as micro-batches."""
    total = len(global_indices)
    if total % (dp_size * micro_batch_size):
        raise ConfigError(
            f"batch.globalBatchSize ({total}) must be a multiple of batch.microBatchSize "
            f"({micro_batch_size}) x data-parallel degree ({dp_size})"
        )
    share = total // dp_size
    mine = global_indices[dp_rank * share : (dp_rank + 1) * share]
    return [mine[i : i + micro_batch_size] for i in range(0, share, micro_batch_size)]


@dataclass
class DataState:
    """Everything needed to continue the data order: saved in checkpoints."""

    consumed_samples: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataState:
        return cls(consumed_samples=int(state["consumed_samples"]))


class BatchSource:
    """Feeds one data-parallel rank: the rows of its micro-batches for the next step."""

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        state: DataState | None = None,
        held_out: int = 0,
    ) -> None:
        self.dataset = dataset
        # The last `held_out` rows are the validation set: the order never reaches them.
        self.num_sequences = len(dataset) - held_out
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.state = state or DataState()
        # Fail at construction, not at step 1, on a batch that does not divide.
        rank_micro_batches(np.zeros(global_batch_size), 0, dp_size, micro_batch_size)

    def next_micro_batches(self) -> list[np.ndarray]:
        """Rows (each seq_length + 1 tokens) per micro-batch; advances the state."""
        indices = global_batch_indices(
            self.num_sequences, self.seed, self.state.consumed_samples, self.global_batch_size
        )
        self.state.consumed_samples += self.global_batch_size
        return [
            self.dataset.rows(mb)
            for mb in rank_micro_batches(
                indices, self.dp_rank, self.dp_size, self.micro_batch_size
            )
        ]


def validation_rounds(
    num_sequences: int,
    held_out: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
) -> list[list[np.ndarray]]:
    """Row indices of the validation set (the last `held_out` rows, in order), as global
    batches, each as this data-parallel rank's micro-batches. Pure."""
    first = num_sequences - held_out
    return [
        rank_micro_batches(
            np.arange(start, start + global_batch_size), dp_rank, dp_size, micro_batch_size
        )
        for start in range(first, num_sequences, global_batch_size)
    ]
