"""The CRD's cross-field CEL rules (operator/llamajob/cel.py) on the real API server.

Each rule mirrors a Python check (plan.validate_layout or a model validator). Two things are
proved here: a bad job is refused by `kubectl apply` naming the field and the fix, and the API
server and the Python agree on a matrix of jobs: every job the Python accepts is admitted (a
stricter rule would block jobs the operator runs), and every job it refuses is refused naming
exactly the fields the Python names.
"""

from __future__ import annotations

import copy
import itertools
import random
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES, ROOT
from k8s_control_plane import ControlPlane
from llamajob import cel
from llamajob.api import GROUP, PLURAL, VERSION, LlamaTrainingJobSpec
from llamajob.catalogue import INSTANCE_TYPES
from llamajob.jobfile import JobFileError, parse_job
from llamajob.plan import validate_layout
from llamajob_trainer.presets import PRESETS

Doc = dict[str, Any]


def example(name: str) -> Doc:
    doc: Doc = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    return doc


def changed(doc: Doc, **fields: Any) -> Doc:
    """A copy with dotted spec fields set (None deletes one)."""
    out = copy.deepcopy(doc)
    for dotted, value in fields.items():
        node = out["spec"]
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


def python_verdict(doc: Doc) -> tuple[set[str], bool]:
    """The fields the Python refuses (model validation, then validate_layout), and whether the
    refusal came from the models (then validate_layout never ran)."""
    try:
        job = parse_job(doc)
    except JobFileError as exc:
        return {e.field for e in exc.errors}, True
    return {e.field for e in validate_layout(job.spec)}, False


# --- without a server ----------------------------------------------------------------------------
# One job per rule that breaks it (and the Python check it mirrors), with a word of the fix that
# the message must carry. Built from examples so that each stays otherwise realistic.
TINY = example("tiny")
L8B = example("llama3-8b")
BAD: dict[str, tuple[Doc, str]] = {
    "backend": (changed(TINY, backend="nxd"), "use auto or torch"),
    "hyperpod": (changed(TINY, **{"cluster.instanceType": "trn3.48xlarge",
                                  "cluster.processesPerNode": 2}), "set hyperpod: false"),
    "device": (changed(TINY, device="cuda"), "use auto or cpu"),
    "processes-per-node": (changed(TINY, **{"cluster.instanceType": "ml.g5.12xlarge",
                                            "cluster.processesPerNode": 8}), "4 GPUs"),
    "hidden-size": (changed(TINY, **{"model.hiddenSize": 130}), "use a multiple of 4"),
    "head-dim-even": (changed(TINY, **{"model.hiddenSize": 132}), "use a multiple of 8"),
    "kv-heads": (changed(TINY, **{"model.numKvHeads": 3}), "use a divisor of 4"),
    "seq-length": (changed(TINY, **{"data.seqLength": 2048}), "maxPositionEmbeddings 1024"),
    "tensor-world": (changed(TINY, **{"parallelism.tensor": 3, "cluster.nodes": 2,
                                      "cluster.processesPerNode": 16}),
                     "3 does not divide the world size 32 (2 node(s) x 16 processes); "
                     "use a divisor of 32"),
    "pipeline-world": (changed(TINY, **{"parallelism.pipeline": 4}), "use a divisor of 2"),
    "tensor-node": (changed(L8B, **{"cluster.nodes": 4, "cluster.processesPerNode": 8,
                                    "parallelism.kvReplicator": 1}), "one node of 8 cores"),
    "tensor-trn1": (changed(L8B, **{"parallelism.tensor": 16}), "use one of [1, 2, 4, 8, 32]"),
    "tensor-heads": (changed(TINY, **{"parallelism.tensor": 8, "cluster.processesPerNode": 8}),
                     "use a divisor of 4"),
    "tensor-split": (changed(TINY, **{"parallelism.tensor": 4, "cluster.processesPerNode": 4,
                                      "model.intermediateSize": 390}),
                     "model.intermediateSize 390"),
    "kv-replicator-nxd": (changed(L8B, **{"parallelism.kvReplicator": 3}), "use one of [4]"),
    "tensor-kv-torch": (changed(TINY, **{"parallelism.tensor": 4,
                                         "cluster.processesPerNode": 4}), "use a divisor of 2"),
    "kv-replicator-torch": (changed(TINY, **{"parallelism.kvReplicator": 2}), "use 1"),
    "torch-compile-nxd": (changed(L8B, **{"compile.torchCompile": True}), "use false"),
    "torch-compile-tensor": (changed(TINY, **{"compile.torchCompile": True,
                                              "parallelism.tensor": 2}), "or false"),
    "pipeline-layers": (changed(TINY, **{"parallelism.pipeline": 3, "cluster.nodes": 3,
                                         "cluster.processesPerNode": 1,
                                         "batch.globalBatchSize": 32}), "use a divisor of 4"),
    "virtual-pipeline-layers": (changed(TINY, **{
        "parallelism.pipeline": 2, "parallelism.virtualPipeline": 4,
        "parallelism.pipelineSchedule": "Interleaved1F1B", "batch.globalBatchSize": 32}),
        "use a divisor of 2"),
    "virtual-pipeline-needs-pipeline": (changed(TINY, **{
        "parallelism.virtualPipeline": 2, "parallelism.pipelineSchedule": "Interleaved1F1B"}),
        "needs pipeline > 1; use 1"),
    "pipeline-schedule": (changed(TINY, **{"parallelism.pipeline": 2,
                                           "parallelism.virtualPipeline": 2,
                                           "batch.globalBatchSize": 32}),
                          "needs Interleaved1F1B"),
    "global-batch": (changed(TINY, **{"batch.globalBatchSize": 24, "validation.sequences": 48}),
                     "use a multiple of 16"),
    "global-batch-pipeline": (changed(TINY, **{"parallelism.pipeline": 2,
                                               "batch.globalBatchSize": 8}),
                              "use at least 16"),
    "min-lr": (changed(TINY, **{"optimizer.minLr": 0.01}), "lower minLr"),
    "validation-sequences": (changed(TINY, **{"validation.sequences": 40}),
                             "use a multiple of 16"),
}
RULES = {r.name: r for r in cel.RULES}


def test_every_rule_has_a_bad_job() -> None:
    assert set(BAD) == set(RULES)


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_python_refuses_each_bad_job_on_the_rules_field(name: str) -> None:
    """The rule's Python counterpart refuses its bad job, on the field the rule names (so the
    bad jobs below test the rules, not typos)."""
    fields, _ = python_verdict(BAD[name][0])
    field = f"spec.{RULES[name].field}"
    assert any(field.startswith(f) for f in fields), (name, fields)


def test_rule_fields_exist_in_the_schema() -> None:
    from llamajob.crd import crd

    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for rule in cel.RULES:
        node = spec
        for part in rule.field.split("."):
            node = node["properties"][part]
    assert spec["x-kubernetes-validations"][-len(cel.RULES):] == cel.validations()


def test_defaults_come_from_the_models() -> None:
    spec = LlamaTrainingJobSpec()
    assert cel.default("cluster.instanceType") == spec.cluster.instance_type
    assert cel.default("parallelism.tensor") == spec.parallelism.tensor
    assert cel.default("batch.globalBatchSize") == spec.batch.global_batch_size
    assert cel.default("optimizer.minLr") == spec.optimizer.min_lr
    assert cel.default("model.preset") == spec.model.preset
    # The terms read the absent processesPerNode as the cores of the instance type.
    assert cel.default("cluster.processesPerNode") is None


# --- on the real API server ----------------------------------------------------------------------
_NAMESPACES = itertools.count(1)


@pytest.fixture(scope="module")
def ns(k8s: ControlPlane, crd: dict[str, Any]) -> str:
    name = f"cel-{next(_NAMESPACES)}"
    k8s.create_namespace(name)
    return name


def test_the_crd_installs_with_every_rule(crd: dict[str, Any]) -> None:
    """The server refuses a CRD whose rules exceed the CEL cost budget; this one is installed."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in schema["x-kubernetes-validations"]]
    assert all(r.to_schema()["rule"] in rules for r in cel.RULES)


@pytest.mark.parametrize("name", sorted(BAD))
def test_kubectl_apply_refuses_a_bad_job_naming_the_field_and_the_fix(
    k8s: ControlPlane, ns: str, name: str
) -> None:
    doc, fix = BAD[name]
    doc = changed(doc)
    doc["metadata"]["name"] = f"bad-{name}"
    out = k8s.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert out.returncode != 0, out.stdout
    assert f"spec.{RULES[name].field}: Invalid value" in out.stderr, out.stderr
    assert fix in out.stderr, out.stderr
    missing = k8s.kubectl("get", "ltj", f"bad-{name}", "-n", ns, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def _matrix() -> list[Doc]:
    """Every example, and variations of each in one field, plus seeded random combinations."""
    bases = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    explicit = {  # llama3-8b spelled out over the tiny preset
        "model.preset": "tiny", "model.hiddenSize": 4096, "model.numLayers": 32,
        "model.numHeads": 32, "model.numKvHeads": 8, "model.intermediateSize": 14336,
        "model.vocabSize": 128256, "model.maxPositionEmbeddings": 8192,
    }
    axes: dict[str, list[Any]] = {
        "parallelism.tensor": [1, 2, 3, 4, 8, 16, 32, 64],
        "parallelism.pipeline": [1, 2, 3, 4, 8],
        "parallelism.virtualPipeline": [1, 2, 3],
        "cluster.nodes": [1, 2, 3],
        "cluster.processesPerNode": [None, 1, 2, 4, 8, 16, 64, 128],
        "model.numHeads": [6, 8, 64],
        "model.numKvHeads": [1, 3, 8],
        "parallelism.kvReplicator": [1, 2, 3, 4, 8],
        "model.numLayers": [3, 6, 8],
        "batch.microBatchSize": [1, 2, 3],
        "batch.globalBatchSize": [8, 12, 64, 2048],
        "cluster.instanceType": list(INSTANCE_TYPES),
        "backend": ["auto", "torch", "nxd"],
        "device": ["auto", "cpu", "cuda", "neuron"],
        "model.preset": list(PRESETS),
        "parallelism.pipelineSchedule": ["Interleaved1F1B"],
        "compile.torchCompile": [True],
        "cluster.hyperpod": [False],
        "data.seqLength": [4096],
    }
    docs: list[Doc] = []
    for base in bases:
        # Held-out sequences must be a multiple of the global batch; 0 keeps the batch axes free.
        base = changed(base, **{"validation.sequences": None})
        docs.append(base)
        docs.append(changed(base, **explicit))
        for key, values in axes.items():
            docs.extend(changed(base, **{key: v}) for v in values)
    rng = random.Random(20261206)
    for _ in range(250):
        base = changed(rng.choice(bases), **{"validation.sequences": None})
        picks = rng.sample(sorted(axes), rng.randint(2, 4))
        docs.append(changed(base, **{k: rng.choice(axes[k]) for k in picks}))
    return docs


def test_the_api_server_and_the_python_agree(k8s: ControlPlane, ns: str) -> None:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}?dryRun=All"
    disagreements: list[str] = []
    docs = _matrix()
    refused = 0
    for i, doc in enumerate(docs):
        doc["metadata"]["name"] = f"m{i}"
        fields, from_models = python_verdict(doc)
        resp = k8s.request("POST", path, doc)
        admitted = 200 <= resp.status < 300
        got = set() if admitted else {
            c.get("field", "") for c in resp.body.get("details", {}).get("causes", [])
        }
        refused += not admitted
        if not fields:
            ok = admitted
        elif from_models:
            # validate_layout never ran: the server names each field the models name (or one
            # inside it, for a model-level check), and may name layout errors besides.
            ok = not admitted and all(any(g.startswith(f) for g in got) for f in fields)
        else:
            ok = fields <= cel.FIELDS and got == fields
        if not ok:
            spec = yaml.safe_dump(doc["spec"], default_flow_style=True, width=10**6)
            disagreements.append(f"python {sorted(fields)} server {sorted(got)}: {spec}")
    assert not disagreements, f"{len(disagreements)} of {len(docs)}:\n" + "\n".join(
        disagreements[:10])
    # The matrix exercises both verdicts plentifully.
    assert refused > len(docs) // 4 and len(docs) - refused > len(docs) // 10
