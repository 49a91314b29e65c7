"""prepare-data (packing, metadata, inputs, tokenizers) and the deterministic reading order."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llamajob_trainer.cli import prepare_data_main
from llamajob_trainer.data import (
    BUILTIN_PYDOC,
    BatchSource,
    DataState,
    PackedDataset,
    Packer,
    check_compatible,
    global_batch_indices,
    prepare_data,
    rank_micro_batches,
    read_metadata,
    token_dtype,
    validation_rounds,
)
from llamajob_trainer.errors import ConfigError, DataError
from llamajob_trainer.tokenizer import ByteTokenizer, load_tokenizer

BYTE = ByteTokenizer()

# --- packing ---------------------------------------------------------------------------------


def test_packer_cuts_overlapping_rows_with_eos_between_documents() -> None:
    packer = Packer(seq_length=4, eos_id=99)
    assert packer.add([1, 2, 3]) == []  # 1 2 3 EOS: one short of a 5-token row
    rows = packer.add([4, 5, 6, 7, 8])  # stream: 1 2 3 99 4 5 6 7 8 99
    assert rows == [[1, 2, 3, 99, 4], [4, 5, 6, 7, 8]]
    assert packer.leftover == 2  # 8 99: the last token of one row starts the next
    assert packer.add([]) == [] and packer.leftover == 3  # an empty document is just an EOS


def test_prepare_text_jsonl_parquet_and_read_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("héllo world, " * 20)
    (src / "b.jsonl").write_text(
        json.dumps({"text": "first json doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"]}), src / "c.parquet")
    (src / "ignored.bin").write_bytes(b"\0")
    meta = prepare_data([str(src)], tmp_path / "ds", BYTE, seq_length=16, progress=False)

    docs = [("héllo world, " * 20), "first json doc", "second", "parquet one", "parquet two"]
    stream: list[int] = []
    for doc in docs:
        stream += [*doc.encode(), BYTE.eos_id]
    n_rows = (len(stream) - 1) // 16
    assert meta["num_sequences"] == n_rows
    assert meta["documents"] == 5
    assert meta["dropped_tail_tokens"] == len(stream) - n_rows * 16
    assert meta["seq_length"] == 16 and meta["row_length"] == 17
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == {"identity": "byte-level-v1", "vocab_size": 259, "eos_id": 257}
    assert [Path(s).name for s in meta["sources"]] == ["a.txt", "b.jsonl", "c.parquet"]
    raw = (tmp_path / "ds" / "tokens.bin").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == meta["sha256"]
    assert read_metadata(tmp_path / "ds") == meta

    ds = PackedDataset(tmp_path / "ds")
    rows = ds.rows(np.arange(len(ds)))
    assert rows.dtype == np.int64 and rows.shape == (n_rows, 17)
    for i, row in enumerate(rows):
        assert row.tolist() == stream[i * 16 : i * 16 + 17]


def test_builtin_corpus_via_cli_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert prepare_data_main(["--no-progress"]) == 0
    meta = read_metadata(tmp_path / "data" / "pydoc")
    assert meta["sources"] == [BUILTIN_PYDOC]
    assert meta["seq_length"] == 128
    assert meta["num_sequences"] > 3000  # the Python help topics: ~465k characters
    text = BYTE.decode(PackedDataset(tmp_path / "data" / "pydoc").rows(np.arange(40))[:, :-1]
                       .reshape(-1).tolist())
    assert "assert" in text or "class" in text  # real prose about Python, not noise


def test_hf_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json works too
    assert loaded.vocab_size == 7 and loaded.eos_id == 1
    assert loaded.identity.startswith("hf:")
    (tmp_path / "in.txt").write_text("the cat sat on the mat")
    meta = prepare_data([str(tmp_path / "in.txt")], tmp_path / "ds", loaded, 3, progress=False)
    assert meta["tokenizer"]["identity"] == loaded.identity
    rows = PackedDataset(tmp_path / "ds").rows(np.arange(2)).tolist()
    assert rows == [[2, 3, 4, 5], [5, 2, 6, 1]]  # the cat sat on | on the mat </s>

    # tokenizer_config.json's eos_token wins over the built-in candidates.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "mat"}))
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == 6


def test_unreadable_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read tokenizer"):
        load_tokenizer(str(bad))
    with pytest.raises(ConfigError, match=r"is not a tokenizer\.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_bad_inputs_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: .*string field \"text\""):
        prepare_data([str(tmp_path / "x.jsonl")], tmp_path / "ds", BYTE, 4, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare_data([str(tmp_path / "nope.txt")], tmp_path / "ds", BYTE, 4, progress=False)
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(DataError, match="too little text"):
        prepare_data([str(tmp_path / "short.txt")], tmp_path / "ds", BYTE, 64, progress=False)
    assert not (tmp_path / "ds" / "metadata.json").exists()  # never a half dataset


def test_dtype_follows_vocabulary() -> None:
    assert token_dtype(512) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(128256) == np.dtype("<u4")


# --- reading and validation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "small"
    texts = tmp_path_factory.mktemp("txt")
    (texts / "t.txt").write_text("".join(chr(97 + i % 26) for i in range(30 * 8 + 1)))
    prepare_data([str(texts / "t.txt")], out, BYTE, seq_length=8, progress=False)
    return out


def test_missing_or_damaged_dataset(tmp_path: Path, small_ds: Path) -> None:
    with pytest.raises(DataError, match="does not exist; create it with `llamajob prepare-data"):
        PackedDataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no metadata\.json"):
        PackedDataset(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text((small_ds / "metadata.json").read_text())
    (broken / "tokens.bin").write_bytes((small_ds / "tokens.bin").read_bytes()[:-2])
    size = 30 * 9 * 2  # 241 characters + EOS -> 30 rows of 9 uint16 tokens
    assert (small_ds / "tokens.bin").stat().st_size == size
    with pytest.raises(DataError, match=f"has {size - 2} bytes but its metadata promises {size}"):
        PackedDataset(broken)


def test_compatibility_checks(small_ds: Path) -> None:
    meta = read_metadata(small_ds)
    ok = {"seq_length": 8, "vocab_size": 512, "global_batch_size": 4, "tokenizer_identity": None}
    check_compatible(meta, **ok)
    with pytest.raises(ConfigError, match=r"data\.seqLength is 16 .* packed with seq_length 8"):
        check_compatible(meta, **{**ok, "seq_length": 16})
    with pytest.raises(ConfigError, match="259 ids but the model's vocabulary is 200"):
        check_compatible(meta, **{**ok, "vocab_size": 200})
    with pytest.raises(ConfigError, match="not the tokenizer the dataset was prepared with"):
        check_compatible(meta, **{**ok, "tokenizer_identity": "hf:0123"})
    with pytest.raises(DataError, match="fewer than one global batch"):
        check_compatible(meta, **{**ok, "global_batch_size": 64})
    check_compatible(meta, **ok, held_out=24)  # 30 rows: 24 held out, 6 left >= 4
    with pytest.raises(DataError, match=r"validation\.sequences \(28\) leaves fewer than one"):
        check_compatible(meta, **ok, held_out=28)


# --- order -----------------------------------------------------------------------------------


def test_order_is_a_seeded_permutation_per_epoch() -> None:
    n, gbs = 10, 4
    first = np.concatenate([global_batch_indices(n, 3, c, gbs) for c in range(0, 20, gbs)])
    again = np.concatenate([global_batch_indices(n, 3, c, gbs) for c in range(0, 20, gbs)])
    assert np.array_equal(first, again)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:])  # each epoch reshuffles
    assert not np.array_equal(first, np.concatenate(
        [global_batch_indices(n, 4, c, gbs) for c in range(0, 20, gbs)]
    ))
    # A batch that straddles the epoch boundary takes the end of one and the start of the next.
    assert np.array_equal(global_batch_indices(n, 3, 8, 4), first[8:12])


def test_dp_ranks_get_disjoint_contiguous_shares() -> None:
    batch = global_batch_indices(1000, 1, 0, 16)
    shares = [rank_micro_batches(batch, r, 4, 2) for r in range(4)]
    assert all(len(s) == 2 and all(len(mb) == 2 for mb in s) for s in shares)
    flat = [np.concatenate(s) for s in shares]
    assert np.array_equal(np.concatenate(flat), batch)  # contiguous, in order, nothing lost
    assert len(set(np.concatenate(flat).tolist())) == 16  # disjoint
    with pytest.raises(ConfigError, match=r"multiple of batch\.microBatchSize"):
        rank_micro_batches(batch, 0, 3, 2)


def test_state_round_trip_continues_exactly(small_ds: Path) -> None:
    ds = PackedDataset(small_ds)
    kw = {"seed": 5, "global_batch_size": 4, "micro_batch_size": 1, "dp_rank": 1, "dp_size": 2}
    straight = BatchSource(ds, **kw)
    seen = [straight.next_micro_batches() for _ in range(12)]  # 48 samples: over 1.5 epochs
    saved = DataState.from_state_dict(json.loads(json.dumps(straight.state.state_dict())))
    assert saved.consumed_samples == 48
    resumed = BatchSource(ds, **kw, state=DataState(consumed_samples=20))
    for expected in seen[5:]:
        got = resumed.next_micro_batches()
        assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    assert resumed.state == saved


def test_validation_rows_are_the_tail_and_never_trained_on(tmp_path: Path) -> None:
    # 30 rows, all distinct (a period of 90 characters, 8 new ones per row), so rows identify
    # their index.
    (tmp_path / "t.txt").write_text("".join(chr(33 + i % 90) for i in range(30 * 8 + 1)))
    prepare_data([str(tmp_path / "t.txt")], tmp_path / "ds", BYTE, seq_length=8, progress=False)
    ds = PackedDataset(tmp_path / "ds")
    assert len(ds) == 30
    held_out = 8
    trained: set[int] = set()
    for rank in range(2):
        source = BatchSource(ds, seed=5, global_batch_size=4, micro_batch_size=1, dp_rank=rank,
                             dp_size=2, held_out=held_out)
        for _ in range(30):  # 60 samples per rank's source: several epochs of 22 rows
            for rows in source.next_micro_batches():
                trained.update(_row_ids(ds, rows))
    assert trained == set(range(22))  # every training row, none of the held-out ones

    rounds = [validation_rounds(30, held_out, 4, r, 2, 1) for r in range(2)]
    assert [len(r) for r in rounds] == [2, 2]  # two global batches of 4
    seen = [int(i) for r in rounds for batch in r for mb in batch for i in mb]
    assert sorted(seen) == list(range(22, 30))  # each held-out row once, across the ranks
    assert [mb.tolist() for mb in rounds[1][0]] == [[24], [25]]  # rank 1: second half
    assert validation_rounds(30, 0, 4, 0, 2, 1) == []


def _row_ids(ds: PackedDataset, rows: np.ndarray) -> list[int]:
    """Which dataset rows these are (rows of the dataset are distinct)."""
    every = ds.rows(np.arange(len(ds)))
    ids = [np.flatnonzero((every == row).all(axis=1)) for row in rows]
    assert all(len(i) == 1 for i in ids)
    return [int(i[0]) for i in ids]


# --- --config: a job file or a trainer config; the Hub tokenizer ------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_config_takes_a_job_file_converted_as_the_operator_does(tmp_path: Path) -> None:
    from llamajob.jobfile import load_job
    from llamajob.plan import make_plan
    from llamajob.render import render_configmap, trainer_config
    from llamajob_trainer.cli import load_config

    for name in ("tiny", "llama3-8b", "llama3-70b"):
        job = load_job(ROOT / "examples" / f"{name}.yaml")
        expected = trainer_config(job, make_plan(job.spec))
        assert load_config(ROOT / "examples" / f"{name}.yaml") == expected
        # The trainer config the operator renders (what pods read) keeps working.
        rendered = tmp_path / f"{name}-config.yaml"
        rendered.write_text(render_configmap(job, make_plan(job.spec))["data"]["config.yaml"])
        assert load_config(rendered) == expected


def test_config_refuses_other_files_naming_both_kinds(tmp_path: Path) -> None:
    from llamajob_trainer.cli import load_config

    cases = {
        "deployment.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n",
        "other.yaml": "foo: 1\n",
        "list.yaml": "- 1\n- 2\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        assert "LlamaTrainingJob" in str(err.value) and "trainer config" in str(err.value), name
    bad_job = (ROOT / "examples" / "tiny.yaml").read_text().replace("tensor: 1", "tensor: 3")
    (tmp_path / "bad-job.yaml").write_text(bad_job)
    with pytest.raises(ConfigError, match=r"job file .*spec\.parallelism\.tensor"):
        load_config(tmp_path / "bad-job.yaml")
    typo = (ROOT / "examples" / "tiny.yaml").read_text().replace("seqLength", "seqLenght")
    (tmp_path / "typo-job.yaml").write_text(typo)
    with pytest.raises(ConfigError, match=r"job file .*spec\.data\.seqLenght: unknown field"):
        load_config(tmp_path / "typo-job.yaml")


def test_prepare_data_takes_the_job_files_values(tmp_path: Path) -> None:
    job = (ROOT / "examples" / "tiny.yaml").read_text()
    job = job.replace("seqLength: 128", "seqLength: 16").replace("data/pydoc", str(tmp_path / "ds"))
    (tmp_path / "job.yaml").write_text(job)
    (tmp_path / "in.txt").write_text("Some text, long enough for a few rows of 17 tokens. " * 4)
    argv = ["--config", str(tmp_path / "job.yaml"), "--input", str(tmp_path / "in.txt"),
            "--no-progress"]
    assert prepare_data_main(argv) == 0
    meta = read_metadata(tmp_path / "ds")
    assert meta["seq_length"] == 16 and meta["tokenizer"]["identity"] == BYTE.identity


def test_hub_repo_ids_are_told_from_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamajob_trainer.tokenizer import is_hub_repo_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_repo_id("meta-llama/Meta-Llama-3-8B")
    assert is_hub_repo_id("org/name.v2")
    for spec in (None, "", "byte", "/fsx/llama3/tokenizer.json", "llama3/tokenizer.json",
                 "./org/name", "a/b/c", "org/", "../x", "org/-x"):
        assert not is_hub_repo_id(spec), spec
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_repo_id("org/name")  # an existing local directory wins


def _toy_hub(root: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|end_of_text|>", "the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    return root


def test_hub_tokenizer_download_is_mocked_and_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamajob_trainer import tokenizer as tok_module

    hub = _toy_hub(tmp_path / "hub")
    seen: list[tuple[str, str, str | None]] = []

    class EntryNotFoundError(Exception):  # what huggingface_hub raises for a missing file
        pass

    def fake(repo_id: str, filename: str, token: str | None) -> str:
        seen.append((repo_id, filename, token))
        if not (hub / filename).exists():
            raise EntryNotFoundError(filename)
        return str(hub / filename)

    monkeypatch.setattr(tok_module, "_hub_download", fake)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "in.txt").write_text("the cat sat on the mat " * 10)
    saved = tmp_path / "fsx" / "tok"
    argv = ["--tokenizer", "org/model", "--save-tokenizer", str(saved), "--seq-length", "8",
            "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "ds"),
            "--no-progress"]
    assert prepare_data_main(argv) == 0
    assert seen == [("org/model", "tokenizer.json", None), ("org/model", "tokenizer_config.json",
                                                              None)]
    assert (saved / "tokenizer.json").read_bytes() == (hub / "tokenizer.json").read_bytes()
    meta = read_metadata(tmp_path / "ds")
    assert meta["tokenizer"]["identity"] == load_tokenizer(str(saved)).identity
    assert meta["tokenizer"]["eos_id"] == 1
    # The same file again is fine; a different one at that path is refused, not overwritten.
    assert prepare_data_main(argv) == 0
    (saved / "tokenizer.json").write_text("{}")
    assert prepare_data_main(argv) == 78
    assert (saved / "tokenizer.json").read_text() == "{}"


def test_hub_refusals_say_what_to_do(tmp_path: Path) -> None:
    from llamajob_trainer.tokenizer import download_hub_tokenizer

    class GatedRepoError(Exception):
        pass

    class RepositoryNotFoundError(Exception):
        pass

    def gated(repo_id: str, filename: str, token: str | None) -> str:
        raise GatedRepoError("403")

    def missing(repo_id: str, filename: str, token: str | None) -> str:
        raise RepositoryNotFoundError("404")

    def offline(repo_id: str, filename: str, token: str | None) -> str:
        raise ConnectionError("no route to host")

    with pytest.raises(ConfigError, match=r"accept its license on https://huggingface.co/m/x"):
        download_hub_tokenizer("m/x", token="hf_x", download=gated)
    with pytest.raises(ConfigError, match="HF_TOKEN is not set"):
        download_hub_tokenizer("m/x", token="", download=gated)
    with pytest.raises(ConfigError, match="no such model repository"):
        download_hub_tokenizer("m/x", token="hf_x", download=missing)
    with pytest.raises(ConnectionError):  # transient: the Job's retry may work
        download_hub_tokenizer("m/x", token="hf_x", download=offline)
