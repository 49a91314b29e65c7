"""Bad job files and flags through the real CLI: exit 2, one line naming the field, no traceback.

Every case is a file a person could write. `llamajob plan` and `llamajob render` read it the same
way (and so does the operator, through `jobfile.parse_job`); for the metadata.name cases
`llamajob run` must also refuse before it creates anything.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT
from llamajob import api, render
from llamajob.jobfile import JobFileError, load_job, parse_job
from llamajob.plan import make_plan
from llamajob_trainer import config, protocol

TINY: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
INF, NAN = float("inf"), float("nan")


def tiny(**changes: Any) -> str:
    """The tiny example with `changes` applied, as YAML. Keys are paths with '__' between the
    parts (`spec__optimizer__eps`), relative to the object."""
    obj = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = obj
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return yaml.safe_dump(obj, sort_keys=False)


def cluster(**changes: Any) -> str:
    return tiny(**{f"spec__cluster__{k}": v for k, v in changes.items()})


def volume(name: str = "fsx", mount_path: str = "/fsx") -> dict[str, str]:
    return {"name": name, "claimName": "fsx-claim", "mountPath": mount_path}


HEADER = "apiVersion: llamajob.dev/v1alpha1\nkind: LlamaTrainingJob\nmetadata:\n  name: deep\n"
DUPLICATE = """\
apiVersion: llamajob.dev/v1alpha1
kind: LlamaTrainingJob
metadata:
  name: dup
spec:
  maxSteps: 10
  batch:
    globalBatchSize: 8
  maxSteps: 20
"""


class Case(NamedTuple):
    id: str
    text: str
    field: str  # the line starts with "error: {field}"
    fragment: str = ""  # and contains this


CASES = [
    # Finite floats only.
    Case("weight-decay-inf", tiny(spec__optimizer__weightDecay=INF), "spec.optimizer.weightDecay"),
    Case("eps-inf", tiny(spec__optimizer__eps=INF), "spec.optimizer.eps", "finite"),
    Case("rope-theta-inf", tiny(spec__model__ropeTheta=INF), "spec.model.ropeTheta", "finite"),
    Case("lr-nan", tiny(spec__optimizer__lr=NAN), "spec.optimizer.lr"),
    Case("grad-clip-inf", tiny(spec__optimizer__gradClip=INF), "spec.optimizer.gradClip"),
    Case("beta-nan", tiny(spec__optimizer__betas=[0.9, NAN]), "spec.optimizer.betas[1]"),
    # RoPE needs an even head dim: tiny has 4 heads, so 132 gives 33.
    Case("odd-head-dim", tiny(spec__model__hiddenSize=132), "spec.model.hiddenSize", "128 or 136"),
    # metadata.name is a DNS subdomain (the local runner makes directories from it).
    Case("name-dotdot", tiny(metadata__name="../escape"), "metadata.name", "DNS subdomain"),
    Case("name-nul", tiny(metadata__name="a\0b"), "metadata.name", "DNS subdomain"),
    Case("name-uppercase", tiny(metadata__name="Llama3"), "metadata.name", "lowercase"),
    Case("name-punctuation", tiny(metadata__name="Llama_3!"), "metadata.name", "lowercase"),
    Case("name-300", tiny(metadata__name="a" * 300), "metadata.name", "at most 253"),
    Case("name-slash", tiny(metadata__name="runs/x"), "metadata.name", "DNS subdomain"),
    Case("namespace", tiny(metadata__namespace="Team_A"), "metadata.namespace", "DNS label"),
    # Only camelCase on the wire: the CRD would prune the snake_case spelling.
    Case("snake-top", tiny(spec__max_steps=5), "spec.max_steps", "use maxSteps"),
    Case(
        "snake-nested",
        tiny(spec__batch__global_batch_size=8),
        "spec.batch.global_batch_size",
        "use globalBatchSize",
    ),
    # YAML that parses but would be read wrongly.
    Case("duplicate-key", DUPLICATE, "", "duplicate key 'maxSteps' (first at line 6)"),
    Case("second-document", tiny() + "---\n" + tiny(), "", "second YAML document"),
    Case("deep", HEADER + "spec: " + "[" * 20000 + "]" * 20000 + "\n", "", "nested more than"),
    # Resource quantities.
    Case("memory-negative", cluster(memory="-5Gi"), "spec.cluster.memory", "positive"),
    Case("cpu-words", cluster(cpu="lots"), "spec.cluster.cpu", "Kubernetes quantity"),
    Case("shm-zero", cluster(shmSize="0Gi"), "spec.cluster.shmSize", "positive"),
    # Our volumes and mounts.
    Case(
        "volume-name-ours",
        cluster(volumes=[volume(name="llamajob-config")]),
        "spec.cluster.volumes[0].name",
        "llamajob-",
    ),
    Case(
        "mount-dev-shm",
        cluster(volumes=[volume(mount_path="/dev/shm")]),
        "spec.cluster.volumes[0].mountPath",
        "/dev/shm",
    ),
    Case(
        "mount-under-config",
        cluster(volumes=[volume(mount_path="/etc/llamajob/extra")]),
        "spec.cluster.volumes[0].mountPath",
        "trainer config",
    ),
    Case(
        "mount-above-ours",
        cluster(volumes=[volume(mount_path="/dev/")]),
        "spec.cluster.volumes[0].mountPath",
        "would hide",
    ),
    Case(
        "mount-twice",
        cluster(volumes=[volume(), volume(name="other", mount_path="/fsx/")]),
        "spec.cluster.volumes[1].mountPath",
        "mounted twice",
    ),
    Case(
        "volume-name-twice",
        cluster(volumes=[volume(), volume(mount_path="/data")]),
        "spec.cluster.volumes[1].name",
        "used twice",
    ),
    # Secret keys and env names.
    Case(
        "secret-key-path",
        cluster(secrets=[{"name": "HF_TOKEN", "secretName": "hf", "key": "../etc/passwd"}]),
        "spec.cluster.secrets[0].key",
        "Secret key",
    ),
    Case(
        "env-config",
        cluster(env=[{"name": "LLAMAJOB_CONFIG", "value": "/tmp/x.yaml"}]),
        "spec.cluster.env[0].name",
        "set by the operator",
    ),
    Case(
        "env-shutdown-timeout",
        cluster(env=[{"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "1"}]),
        "spec.cluster.env[0].name",
        "checkpoint.terminateGraceSeconds",
    ),
    Case(
        "secret-env-ours",
        cluster(secrets=[{"name": "LLAMAJOB_TERMINATION_LOG", "secretName": "s", "key": "k"}]),
        "spec.cluster.secrets[0].name",
        "set by the operator",
    ),
    Case(
        "env-value-nul", cluster(env=[{"name": "A", "value": "x\0y"}]), "spec.cluster.env[0].value"
    ),
    # Paths.
    Case("path-nul", tiny(spec__data__path="data/\0x"), "spec.data.path", "NUL"),
    Case("path-long", tiny(spec__checkpoint__dir="d/" * 2100), "spec.checkpoint.dir", "4096"),
    Case(
        "path-component",
        tiny(spec__compile__cacheDir="c/" + "x" * 256),
        "spec.compile.cacheDir",
        "at most 255",
    ),
    Case("path-empty", tiny(spec__model__tokenizer=""), "spec.model.tokenizer"),
]

# One over each maximum. At the maximum itself the models accept (test_bounds_are_where_stated).
BOUNDS = {
    "model__numHeads": config.MAX_HEADS,
    "model__numKvHeads": config.MAX_HEADS,
    "model__numLayers": config.MAX_LAYERS,
    "model__hiddenSize": config.MAX_HIDDEN,
    "model__intermediateSize": config.MAX_INTERMEDIATE,
    "model__vocabSize": config.MAX_VOCAB,
    "model__maxPositionEmbeddings": config.MAX_POSITIONS,
    "batch__microBatchSize": config.MAX_MICRO_BATCH,
    "batch__globalBatchSize": config.MAX_GLOBAL_BATCH,
    "maxSteps": config.MAX_STEPS,
    "maxTokens": config.MAX_TOKENS,
    "parallelism__tensor": config.MAX_PARALLEL,
    "parallelism__pipeline": config.MAX_PARALLEL,
    "parallelism__virtualPipeline": config.MAX_PARALLEL,
    "parallelism__kvReplicator": config.MAX_PARALLEL,
    "optimizer__warmupSteps": config.MAX_STEPS,
    "checkpoint__everySteps": config.MAX_STEPS,
    "checkpoint__keep": 1000,
    "checkpoint__resume": config.MAX_STEPS,
    "validation__sequences": config.MAX_STEPS,
    "validation__everySteps": config.MAX_STEPS,
    "restartPolicy__hangTimeoutSeconds": 7 * 86400,
    "seed": config.MAX_SEED,
}
CASES += [
    Case(f"max-{path}", tiny(**{f"spec__{path}": limit + 1}), "spec." + path.replace("__", "."))
    for path, limit in BOUNDS.items()
]

NAME_CASES = [c for c in CASES if c.field == "metadata.name"]


def llamajob(bin_: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_, *args], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def assert_one_clear_line(res: subprocess.CompletedProcess[str], field: str, fragment: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    lines = res.stderr.splitlines()
    assert len(lines) == 1, out
    assert res.stdout == "", out
    line = lines[0]
    assert line.startswith(f"error: {field}"), line
    if field:
        assert line.startswith(f"error: {field}: "), line
    assert fragment in line, line


@pytest.mark.parametrize("command", ["plan", "render"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_file_gives_one_line_naming_the_field(
    llamajob_bin: str, tmp_path: Path, case: Case, command: str
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(case.text)
    assert_one_clear_line(llamajob(llamajob_bin, command, str(path)), case.field, case.fragment)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", NAME_CASES, ids=[c.id for c in NAME_CASES])
def test_run_refuses_a_bad_name_before_writing_anything(
    llamajob_bin: str, tmp_path: Path, case: Case
) -> None:
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    path = tmp_path / "job.yaml"
    path.write_text(case.text)
    before = _tree(tmp_path)
    res = llamajob(llamajob_bin, "run", "--no-progress", str(path), cwd=work)
    assert_one_clear_line(res, case.field, case.fragment)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--tokens", "inf"], "--tokens"),
        (["--tokens", "nan"], "--tokens"),
        (["--tokens", "0.5"], "--tokens"),
        (["--tokens", "1e300"], "--tokens"),
        (["--mfu", "nan"], "--mfu"),
        (["--mfu", "1.5"], "--mfu"),
        (["--tflops", "-inf"], "--tflops"),
        (["--price", "lots"], "--price"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_plan_flags_give_one_line(llamajob_bin: str, args: list[str], flag: str) -> None:
    res = llamajob(llamajob_bin, "plan", str(ROOT / "examples" / "tiny.yaml"), *args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and f"argument {flag}: " in lines[0], res.stderr


@pytest.mark.parametrize("command", ["plan", "render", "crd"])
def test_closed_pipe_ends_quietly(llamajob_bin: str, command: str) -> None:
    """`llamajob render job.yaml | head`: the reader is gone before the output is written."""
    args = [] if command == "crd" else [str(ROOT / "examples" / "tiny.yaml")]
    if command == "render":  # the examples set no image (none is published)
        args += ["--trainer-image", "registry.example/llamajob-trainer:0.1.0-cuda"]
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run(
            [llamajob_bin, command, *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert res.stderr == ""
    assert res.returncode == 141  # 128 + SIGPIPE, what a shell reports for `cat` in this spot


# --- the limits themselves ---------------------------------------------------------------------
def _spec_with(path: str, value: Any) -> dict[str, Any]:
    # Without validation, which must be a multiple of the global batch size.
    changes = {"spec__validation__sequences": 0, f"spec__{path}": value}
    return yaml.safe_load(tiny(**changes))


@pytest.mark.parametrize("path", list(BOUNDS), ids=list(BOUNDS))
def test_bounds_are_where_stated(path: str) -> None:
    limit = BOUNDS[path]
    parse_job(_spec_with(path, limit))
    with pytest.raises(JobFileError) as err:
        parse_job(_spec_with(path, limit + 1))
    assert [e.field for e in err.value.errors] == ["spec." + path.replace("__", ".")]


@pytest.mark.parametrize("value", ["480Gi", "64Gi", "120", "500m", "1.5", ".5", "1e3", "+2Ki"])
def test_good_quantities_pass(value: str) -> None:
    job = parse_job(yaml.safe_load(cluster(memory=value, cpu=value, shmSize=value)))
    assert job.spec.cluster.memory == value


@pytest.mark.parametrize("value", ["-5Gi", "0", "0.0", "lots", "5 Gi", "5GB", "1e", "Gi", ""])
def test_bad_quantities_fail(value: str) -> None:
    with pytest.raises(JobFileError) as err:
        parse_job(yaml.safe_load(cluster(memory=value)))
    assert [e.field for e in err.value.errors] == ["spec.cluster.memory"]


@pytest.mark.parametrize("key", ["token", "api-key", "a.b_c", ".hidden", "x" * 253])
def test_good_secret_keys_pass(key: str) -> None:
    parse_job(yaml.safe_load(cluster(secrets=[{"name": "T", "secretName": "s", "key": key}])))


@pytest.mark.parametrize("key", ["../etc/passwd", "a/b", ".", "..", "..x", "", "x" * 254, "a\n"])
def test_bad_secret_keys_fail(key: str) -> None:
    with pytest.raises(JobFileError) as err:
        parse_job(yaml.safe_load(cluster(secrets=[{"name": "T", "secretName": "s", "key": key}])))
    assert [e.field for e in err.value.errors] == ["spec.cluster.secrets[0].key"]


def test_even_head_dims_pass_and_the_suggestion_is_even() -> None:
    parse_job(yaml.safe_load(tiny(spec__model__hiddenSize=136)))  # 34 per head
    with pytest.raises(JobFileError) as err:
        parse_job(yaml.safe_load(tiny(spec__model__hiddenSize=4)))  # 1 per head
    message = err.value.errors[0].message
    assert "use hiddenSize 8" in message
    assert int(re.findall(r"hiddenSize (\d+)", message)[-1]) // 4 % 2 == 0


# --- what the operator itself uses, and what the rules reserve ------------------------------
def _trainium_pod(**cluster_changes: Any) -> dict[str, Any]:
    obj = yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text())
    obj["spec"]["restartPolicy"]["processRestarts"] = 2  # adds the c10d variables
    obj["spec"]["cluster"].update(cluster_changes)
    job = parse_job(obj)
    return render.render_pod(job, make_plan(job.spec), render.ROLE_TRAIN, 1, 0)


def test_reserved_names_cover_what_render_sets() -> None:
    """A variable, volume or mount path the operator adds must be reserved (or, for variables,
    listed as a default a job may override), so that adding one to render.py without the rule
    fails here."""
    pod = _trainium_pod(env=[], secrets=[], volumes=[])
    container = pod["spec"]["containers"][0]
    ours = {e["name"] for e in container["env"]}
    assert ours <= set(api.OPERATOR_ENV) | api.TUNABLE_ENV
    assert not set(api.OPERATOR_ENV) & api.TUNABLE_ENV
    assert {protocol.CONFIG_ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"} <= ours
    for vol in pod["spec"]["volumes"]:
        assert vol["name"].startswith(api.RESERVED_VOLUME_PREFIX)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    mounts.add(container["terminationMessagePath"])
    assert mounts == set(api.RESERVED_MOUNT_PATHS)


def test_tunable_defaults_stay_overridable() -> None:
    pod = _trainium_pod(env=[{"name": "MALLOC_ARENA_MAX", "value": "8"}])
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MALLOC_ARENA_MAX"] == "8"


def test_longest_name_gives_valid_kubernetes_objects(tmp_path: Path) -> None:
    """Any valid metadata.name works: derived names are shortened to DNS labels with a digest."""
    name = ".".join(["a" * 62] * 4) + ".b"  # 253 characters, four dots
    assert len(name) == api.MAX_NAME
    path = tmp_path / "job.yaml"
    path.write_text(tiny(metadata__name=name))
    job = load_job(path)
    docs = render.render_all(job)
    label = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
    for doc in docs:
        assert label.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    assert docs[0]["kind"] == "Service" and docs[0]["metadata"]["name"][0].isalpha()


def test_python_code_still_constructs_models_by_field_name() -> None:
    spec = config.TrainingSpec(max_steps=5, batch=config.BatchSpec(global_batch_size=4))
    assert spec.max_steps == 5 and spec.to_wire()["batch"]["globalBatchSize"] == 4
    assert api.LlamaTrainingJobSpec.model_validate({"max_steps": 7}).max_steps == 7


def test_trainer_reads_the_config_the_operator_writes(tmp_path: Path) -> None:
    from llamajob_trainer.cli import load_config

    obj = yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text())
    obj["spec"]["seed"] = config.MAX_SEED
    obj["spec"]["model"]["ropeTheta"] = 1e6
    job = parse_job(obj)
    configmap = render.render_configmap(job, make_plan(job.spec))
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"][render.CONFIG_KEY])
    expected = render.trainer_config(job, make_plan(job.spec))
    assert load_config(path) == expected
    assert expected.seed == config.MAX_SEED


# --- --config of the trainer commands: a job file or a trainer config, nothing else ----------


@pytest.mark.parametrize("command", ["export-hf", "prepare-data"])
def test_trainer_commands_refuse_other_files_naming_what_they_take(
    llamajob_bin: str, tmp_path: Path, command: str
) -> None:
    other = tmp_path / "deployment.yaml"
    other.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n")
    extra = ["--output", str(tmp_path / "out")]
    res = llamajob(llamajob_bin, command, "--config", str(other), *extra)
    out = res.stdout + res.stderr
    assert res.returncode == protocol.EXIT_CONFIG, out
    assert "Traceback" not in out and "Extra inputs" not in out, out
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"llamajob {command}: error: config file {other} is a Deployment")
    assert "LlamaTrainingJob file" in line and "trainer config" in line, line
    assert not (tmp_path / "out").exists()


def test_export_hf_takes_the_job_file(llamajob_bin: str, tmp_path: Path) -> None:
    """The job file is read (no "Extra inputs are not permitted"); what is missing is the
    checkpoint, which the error names."""
    res = llamajob(llamajob_bin, "export-hf", "--config", str(ROOT / "examples" / "tiny.yaml"),
                   "--output", str(tmp_path / "hf"), cwd=tmp_path)
    out = res.stdout + res.stderr
    assert "Traceback" not in out and "Extra inputs" not in out, out
    (line,) = res.stderr.splitlines()
    assert "no complete checkpoint in runs/tiny/checkpoints" in line, line
