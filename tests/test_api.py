"""The spec models, the generated CRD and the examples agree with each other."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import EXAMPLES, ROOT
from llamajob.api import LlamaTrainingJob, LlamaTrainingJobSpec
from llamajob.crd import crd, crd_yaml
from llamajob.jobfile import JobFileError, parse_job

CRD_FILE = ROOT / "crds" / "llamatrainingjobs.llamajob.dev.yaml"


def _schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _strict(node: Any) -> Any:
    """The API server prunes unknown fields and kubectl's strict field validation reports them;
    jsonschema needs additionalProperties: false to do the same."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schemas use draft-4 semantics (boolean exclusiveMinimum).
    return jsonschema.Draft4Validator(_strict(_schema()))


def test_committed_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        "crds/ is stale: regenerate with `llamajob crd > crds/llamatrainingjobs.llamajob.dev.yaml`"
    )


def test_crd_shape() -> None:
    doc = crd()
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    spec = doc["spec"]
    assert spec["names"]["shortNames"] == ["ltj"]
    assert spec["scope"] == "Namespaced"
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:6] == ["Phase", "Step", "Loss", "Tokens/s", "Restarts", "Age"]


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schema_is_structural() -> None:
    """The rules of a structural schema that a JSON-Schema generator is likely to break."""
    for path, node in _walk(_schema()):
        assert "$ref" not in node, path
        assert "oneOf" not in node and "allOf" not in node, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            for branch in node["anyOf"]:
                assert set(branch) <= {"type", "minimum", "maximum", "enum"}, path
        elif "anyOf" in node:
            pytest.fail(f"anyOf outside int-or-string at {path}")
        is_schema = any(k in node for k in ("type", "properties", "items"))
        if is_schema and not node.get("x-kubernetes-int-or-string"):
            assert "type" in node, f"{path} has no type"


def test_schema_carries_bounds_and_enums() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["parallelism"]["properties"]["tensor"]["minimum"] == 1
    assert "llama3-70b" in spec["model"]["properties"]["preset"]["enum"]
    assert "ml.trn1.32xlarge" in spec["cluster"]["properties"]["instanceType"]["enum"]
    assert spec["optimizer"]["properties"]["lr"]["exclusiveMinimum"] is True
    status = _schema()["properties"]["status"]["properties"]
    assert "Restarting" in status["phase"]["enum"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_crd_schema(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    _validator().validate(obj)
    parse_job(obj)  # and against the models


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda s: s["parallelism"].__setitem__("tensr", 8), "tensr"),
        (lambda s: s["parallelism"].__setitem__("tensor", 0), "minimum"),
        (lambda s: s["model"].__setitem__("preset", "llama4"), "llama4"),
        (lambda s: s["cluster"].__setitem__("instanceType", "p5.48xlarge"), "p5.48xlarge"),
        (lambda s: s["cluster"].__setitem__("podLabels", {"team": "a b"}), "a b"),
        (lambda s: s["cluster"].__setitem__("memory", "-5Gi"), "-5Gi"),
        (lambda s: s["cluster"].__setitem__("shmSize", "lots"), "lots"),
        (lambda s: s["cluster"]["secrets"][0].__setitem__("key", "../etc/passwd"), "passwd"),
        (lambda s: s.__setitem__("maxSteps", 10**9 + 1), "1000000001"),
        (lambda s: s.__setitem__("seed", 2**53), str(2**53)),
        # checkpoint.resume (int or string) is checked by a CEL rule the API server runs:
        # test_real_apiserver.py::test_checkpoint_resume_is_an_int_or_string_checked_by_its_cel_rule
        (lambda s: s["model"].__setitem__("numLayers", 1025), "1025"),
        (lambda s: s["restartPolicy"].__setitem__("hangTimeoutSeconds", 7 * 86400 + 1), "604801"),
        (lambda s: s["data"].__setitem__("path", "a\0b"), "does not match"),
        (lambda s: s["data"].__setitem__("path", "d" * 4097), "is too long"),
    ],
)
def test_crd_schema_rejects_what_the_models_reject(mutate, fragment: str) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text())
    bad = copy.deepcopy(obj)
    mutate(bad["spec"])
    with pytest.raises(jsonschema.ValidationError) as schema_err:
        _validator().validate(bad)
    assert fragment in str(schema_err.value.message) or fragment in str(schema_err.value)
    with pytest.raises(JobFileError):
        parse_job(bad)


@pytest.mark.parametrize(
    "quantity",
    ["480Gi", "120", "500m", "1.5", ".5", "1e3", "+2Ki", "-5Gi", "0", "0.0", "lots", "5GB"],
)
def test_crd_and_models_agree_on_quantities(quantity: str) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["spec"].setdefault("cluster", {})["memory"] = quantity
    try:
        parse_job(obj)
        models = True
    except JobFileError:
        models = False
    assert _validator().is_valid(obj) == models
    assert models == (quantity[0] != "-" and quantity not in {"0", "0.0", "lots", "5GB"})


def test_resume_accepts_a_step_number() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["spec"]["checkpoint"]["resume"] = 150
    _validator().validate(obj)
    assert parse_job(obj).spec.checkpoint.resume == 150


def test_defaults_follow_the_seeds() -> None:
    spec = LlamaTrainingJobSpec()
    assert spec.precision == "bf16-mixed"
    assert spec.parallelism.zero1 is True
    assert spec.parallelism.sequence_parallel is True
    assert spec.checkpoint.resume == "latestIfExists"


def test_wire_round_trip_is_camel_case() -> None:
    job = parse_job(yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text()))
    wire = job.spec.to_wire()
    assert wire["parallelism"]["kvReplicator"] == 4
    assert wire["restartPolicy"]["hangTimeoutSeconds"] == 3600
    again = LlamaTrainingJob.model_validate(
        {"apiVersion": "llamajob.dev/v1alpha1", "kind": "LlamaTrainingJob", "spec": wire}
    )
    assert again.spec == job.spec


def test_every_subpackage_ships_in_the_wheel() -> None:
    """Editable installs hide a subpackage missing from pyproject; the images' wheels do not."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = set()
    for name, root in conf["package-dir"].items():
        for init in (ROOT / root).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / root)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


# --- the trainer image: the job's, or the operator's default for its family -------------------


def _job_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    return body


def test_image_is_optional_and_has_no_made_up_default() -> None:
    spec = LlamaTrainingJobSpec()
    assert spec.cluster.image is None
    image = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["cluster"]["properties"]["image"]
    assert "default" not in image and image["minLength"] == 1
    for path in EXAMPLES:  # no image that does not exist: the operator's default applies
        assert "ghcr.io" not in path.read_text(), path
        assert parse_job(yaml.safe_load(path.read_text())).spec.cluster.image is None, path


@pytest.mark.parametrize(
    ("name", "family"),
    [("llama3-8b", "trn1"), ("llama3-70b", "trn1"), ("llama3-8b-trn2", "neuron"),
     ("llama3-70b-trn2", "neuron"), ("llama3-8b-p5", "cuda"), ("tiny", "cuda")],
)
def test_each_example_has_a_trainer_family(name: str, family: str) -> None:
    from llamajob.images import job_family

    assert job_family(parse_job(_job_body(name))) == family


def test_nxd_on_trn2_uses_the_trn1_image() -> None:
    from llamajob.images import job_family

    body = _job_body("llama3-8b-trn2")
    body["spec"]["backend"] = "nxd"
    assert job_family(parse_job(body)) == "trn1"


def test_trainer_image_flags_parse() -> None:
    from llamajob.images import parse_trainer_images

    assert parse_trainer_images([]) == {}
    assert parse_trainer_images(["r/t:1"]) == {"neuron": "r/t:1", "trn1": "r/t:1", "cuda": "r/t:1"}
    # A family's own image wins over the one for every family, in any order.
    assert parse_trainer_images(["cuda=r/gpu:2", "r/t:1"]) == {
        "neuron": "r/t:1", "trn1": "r/t:1", "cuda": "r/gpu:2"}
    assert parse_trainer_images(["trn1=r/x@sha256:" + "a" * 64]) == {
        "trn1": "r/x@sha256:" + "a" * 64}
    for bad in (["gpu=r/t:1"], ["cuda="], ["r/a:1", "r/b:1"], ["cuda=a:1", "cuda=b:1"], [" "]):
        with pytest.raises(ValueError):
            parse_trainer_images(bad)


def test_operator_fills_the_image_before_planning_and_keys_the_compile_with_it() -> None:
    """decide() (the worker's core call) gives a job without an image the operator's image of
    its family: the pods, the spec revision and the compile key all use it."""
    from datetime import UTC, datetime

    from llamajob.observed import Observed
    from llamajob.plan import make_plan
    from llamajob.worker import decide

    now = datetime(2026, 1, 1, tzinfo=UTC)
    images = {"neuron": "r.example/t:1-neuron", "trn1": "r.example/t:1-trn1",
              "cuda": "r.example/t:1-cuda"}
    body = _job_body("llama3-8b")
    d = decide(body, Observed(), {}, now, "llama3-8b", "ml", images)
    assert d.status.phase == "Compiling"
    pods = [c.manifest for c in d.creates if c.manifest["kind"] == "Pod"]
    assert pods and {p["spec"]["containers"][0]["image"] for p in pods} == {images["trn1"]}
    job = parse_job(body)
    plan = make_plan(job.spec)
    assert d.status.compile_key == job.spec.compile_key(plan.backend, images["trn1"], plan.device)
    assert d.status.compile_key != job.spec.compile_key(plan.backend, None, plan.device)
    # The job's own image wins.
    body["spec"]["cluster"]["image"] = "r.example/mine:2"
    d = decide(body, Observed(), {}, now, "llama3-8b", "ml", images)
    pods = [c.manifest for c in d.creates if c.manifest["kind"] == "Pod"]
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {"r.example/mine:2"}


def test_a_job_without_image_and_no_operator_default_fails_naming_the_field() -> None:
    from datetime import UTC, datetime

    from llamajob.observed import Observed
    from llamajob.worker import decide

    now = datetime(2026, 1, 1, tzinfo=UTC)
    for images in ({}, {"cuda": "r.example/t:1-cuda"}):  # none, or none for trn1
        d = decide(_job_body("llama3-8b"), Observed(), {}, now, "llama3-8b", "ml", images)
        assert d.status.phase == "Failed" and d.creates == []
        failed = next(c for c in d.status.conditions if c.type == "Failed")
        assert failed.reason == "InvalidSpec"
        assert d.status.message.startswith("spec.cluster.image: no trainer image")
        assert "docker build --target trainer-trn1" in d.status.message
        assert "trainerImage" in d.status.message
    # Other problems are reported with it.
    body = _job_body("llama3-8b")
    body["spec"]["parallelism"]["tensor"] = 8  # does not fit
    d = decide(body, Observed(), {}, now, "llama3-8b", "ml", {})
    assert "spec.parallelism" in d.status.message and "spec.cluster.image" in d.status.message
