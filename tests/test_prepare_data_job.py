"""examples/prepare-data-job.yaml: a valid Kubernetes Job whose command is a real
`llamajob prepare-data` invocation, wired to the same claim, mount path and Secret as the training
job it prepares data for; and the command itself, run on a local copy of /fsx with the Hub download
mocked (no network)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT
from llamajob.jobfile import load_job
from llamajob_trainer import tokenizer as tok_module
from llamajob_trainer.cli import prepare_data_main, prepare_data_parser
from llamajob_trainer.data import read_metadata

MANIFEST = ROOT / "examples" / "prepare-data-job.yaml"
TRAINING_JOB = ROOT / "examples" / "llama3-8b.yaml"
KUBE_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert len(docs) == 1
    return docs[0]


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _mounts(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in _container(job)["volumeMounts"]}


def test_manifest_is_a_valid_kubernetes_job(job: dict[str, Any]) -> None:
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    try:
        kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.absolute_path)
        pytest.fail(f"Kubernetes {KUBE_VERSION}, at {path}: {err.message}")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def _args(job: dict[str, Any]) -> list[str]:
    container = _container(job)
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:2] == ["llamajob", "prepare-data"], argv
    return argv[2:]


def test_command_parses_with_the_real_parser(job: dict[str, Any]) -> None:
    args = prepare_data_parser().parse_args(_args(job))
    assert args.config and args.tokenizer and args.input
    # The job file comes from the ConfigMap the comments tell to create.
    source = _mounts(job)[str(Path(args.config).parent)]
    assert "configMap" in source, source
    assert f"kubectl create configmap {source['configMap']['name']} " in MANIFEST.read_text()
    assert f"--from-file={Path(args.config).name}=examples/llama3-8b.yaml" in MANIFEST.read_text()
    assert tok_module.is_hub_repo_id(args.tokenizer)


def test_wired_like_the_training_job(job: dict[str, Any]) -> None:
    """Same claim at the same mount, the same Secret and key as HF_TOKEN, a trainer image, and
    every path the job file names (data.path, model.tokenizer) on that volume."""
    training = load_job(TRAINING_JOB)
    cluster = training.spec.cluster
    container = _container(job)
    # No image is published: the placeholder is the trainer image the examples name.
    image = container["image"]
    assert image == (cluster.image or "<registry>/llamajob-trainer:0.1.0-trn1"), image
    assert f"# image: {image}" in TRAINING_JOB.read_text() or image == cluster.image
    mounts = _mounts(job)
    for volume in cluster.volumes:
        source = mounts[volume.mount_path]
        assert source["persistentVolumeClaim"]["claimName"] == volume.claim_name == "fsx-claim"
    for path in (training.spec.data.path, training.spec.model.tokenizer):
        assert path and any(path.startswith(v.mount_path + "/") for v in cluster.volumes), path
    args = prepare_data_parser().parse_args(_args(job))
    assert all(i.startswith("/fsx/") for i in args.input)
    env = {e["name"]: e for e in container["env"]}
    # The Secret and key the 70B example's pods read HF_TOKEN from (spec.cluster.secrets).
    big = load_job(ROOT / "examples" / "llama3-70b.yaml").spec.cluster.secrets
    (hf,) = [s for s in big if s.name == "HF_TOKEN"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": hf.secret_name, "key": hf.key}
    text = MANIFEST.read_text()
    assert f"kubectl create secret generic {hf.secret_name} --from-literal={hf.key}=" in text


def _toy_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|end_of_text|>", "the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))


def test_the_jobs_command_prepares_the_training_jobs_dataset(
    job: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Job's exact arguments, with /fsx (and /etc/llamajob) moved under tmp_path and the Hub
    replaced by a local toy tokenizer: the dataset lands at the job's data.path with its
    seqLength, and the tokenizer at its model.tokenizer, where training will look."""
    fsx, etc = tmp_path / "fsx", tmp_path / "etc"
    hub = tmp_path / "hub" / "snapshot"
    _toy_tokenizer(hub)
    calls: list[tuple[str, str, str | None]] = []

    def fake_download(repo_id: str, filename: str, token: str | None) -> str:
        calls.append((repo_id, filename, token))
        return str(hub / filename)

    monkeypatch.setattr(tok_module, "_hub_download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test")

    def local(text: str) -> str:
        return text.replace("/fsx", str(fsx)).replace("/etc/llamajob", str(etc))

    etc.mkdir()
    (etc / "job.yaml").write_text(local(TRAINING_JOB.read_text()))
    argv = [local(a) for a in _args(job)]
    args = prepare_data_parser().parse_args(argv)
    training = load_job(etc / "job.yaml")
    seq = training.spec.data.seq_length
    for raw in args.input:
        Path(raw).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": "the cat sat on the mat " * (seq // 3)})] * 2
        (Path(raw) / "part-0.jsonl").write_text("\n".join(lines) + "\n")

    assert prepare_data_main(argv) == 0, shlex.join(argv)
    assert {(c[0], c[2]) for c in calls} == {("meta-llama/Meta-Llama-3-8B", "hf_test")}
    tokenizer = Path(training.spec.model.tokenizer or "")
    assert tokenizer.read_bytes() == (hub / "tokenizer.json").read_bytes()
    assert (tokenizer.parent / "tokenizer_config.json").is_file()
    meta = read_metadata(training.spec.data.path)
    assert meta["seq_length"] == seq and meta["num_sequences"] >= 1
    assert meta["tokenizer"]["identity"] == tok_module.load_tokenizer(str(tokenizer)).identity
    assert meta["tokenizer"]["eos_id"] == 1


def test_user_errors_fail_the_job_at_once(job: dict[str, Any]) -> None:
    """The trainer's permanent exit codes are not retried by the Job either."""
    from llamajob_trainer import protocol

    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["containerName"] == _container(job)["name"]
    assert set(rule["onExitCodes"]["values"]) == set(protocol.PERMANENT_EXIT_CODES)
