"""Cross-field admission rules: CEL (x-kubernetes-validations) generated from the models.

The CRD's schema bounds each field on its own; the rules that relate fields (the tensor degree
and the world size, the heads and the tensor degree, the batch and the data-parallel degree...)
live in ``plan.validate_layout`` and in the models' validators. Those run in the operator, so a bad
job used to be stored and then fail as InvalidSpec. The rules below are the same checks written
in CEL, attached to the CRD's ``spec`` node by ``crd.py``, so that the API server refuses such a
job at ``kubectl apply`` with the field and the fix.

Every rule mirrors one Python check, including the control flow around it (validate_layout stops
after a tensor or pipeline degree that does not divide the world size, and its tensor checks are
an elif chain), so the API server refuses exactly what the Python refuses, field by field:
tests/test_cel_admission.py compares the two on a matrix of jobs. A CEL rule stricter than the
Python would block jobs the operator runs; one looser only leaves the operator's check to catch
it, which it still does (old CRDs carry no rules).

Nothing here is a second copy of data: the instance types come from ``catalogue.INSTANCE_TYPES``
and the architectures from ``presets.PRESETS`` as CEL map literals, and the CRD carries no
defaults (see crd.py), so every rule applies the pydantic field's default itself when a field is
absent, read from the model here.

Two limits of the API server's CEL shape the text:
- ``cel.bind`` is not available, so the shared terms (the world size, the resolved backend...)
  are bound with one-element comprehensions (``bind``).
- The cost estimator counts ``'...' + string(n)`` as a string of unbounded length and refuses the
  CRD; ``'...'.format([...])`` is estimated from its format string, so messages use that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llamajob_trainer.config import MAX_PARALLEL
from llamajob_trainer.presets import PRESETS
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from .api import LlamaTrainingJobSpec
from .catalogue import INSTANCE_TYPES
from .plan import NXD_TRN1_TENSOR_DEGREES

# The API server's reason for every rule: kubectl prints it as "Invalid value".
REASON = "FieldValueInvalid"


# --- CEL text builders ---------------------------------------------------------------------------
def lit(value: Any) -> str:
    """A Python value as a CEL literal (ints, bools, strings, lists and dicts of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if "'" in value or "\\" in value:
            raise ValueError(f"no quoting for {value!r}")
        return f"'{value}'"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(lit(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{lit(k)}: {lit(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no CEL literal for {value!r}")


def _field_info(path: str) -> Any:
    """The pydantic FieldInfo of a camelCase path under the spec, e.g. 'cluster.nodes'."""
    model: type[BaseModel] = LlamaTrainingJobSpec
    info: Any = None
    for part in path.split("."):
        by_alias = {to_camel(name): f for name, f in model.model_fields.items()}
        info = by_alias[part]
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return info


def default(path: str) -> Any:
    """The default the models apply to an absent field (the CRD itself carries none)."""
    value = _field_info(path).get_default(call_default_factory=True)
    return list(value) if isinstance(value, tuple) else value


def get(path: str, otherwise: str | None = None) -> str:
    """The field's value, or ``otherwise`` (CEL) when absent, or else the model's default."""
    parts = path.split(".")
    present = " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))
    fallback = otherwise if otherwise is not None else lit(default(path))
    return f"({present} ? self.{path} : {fallback})"


def message(template: str, *args: str) -> str:
    """A messageExpression body: ``template`` with its %d/%s filled from the CEL ``args``."""
    text = template.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'.format([{', '.join(args)}])" if args else f"'{text}'"


# --- tables from the catalogue and the presets, as CEL literals -----------------------------------
_TYPES = INSTANCE_TYPES.values()
CORES = lit({t.name: t.cores_per_node for t in _TYPES})
FAMILY = lit({t.name: t.family for t in _TYPES})
DEVICE = lit({t.name: t.device for t in _TYPES})
BACKENDS = lit({t.name: list(t.backends) for t in _TYPES})
DEFAULT_BACKEND = lit({t.name: t.backend for t in _TYPES})
BACKENDS_TEXT = lit({t.name: " or ".join(t.backends) for t in _TYPES})
TRAINIUM = lit([t.name for t in _TYPES if t.trainium])
# Types with an accelerator that are not SageMaker HyperPod types (no ml. prefix): validate_layout
# refuses hyperpod: true for them.
NOT_HYPERPOD = lit([t.name for t in _TYPES if t.device_resource and not t.name.startswith("ml.")])
TRN1_DEGREES = lit(list(NXD_TRN1_TENSOR_DEGREES))

# The spec's architecture overrides, in the order of the preset table's columns.
_ARCH_FIELDS = {
    "h": ("hiddenSize", "hidden_size"),
    "l": ("numLayers", "num_layers"),
    "a": ("numHeads", "num_heads"),
    "kv": ("numKvHeads", "num_kv_heads"),
    "isz": ("intermediateSize", "intermediate_size"),
    "vsz": ("vocabSize", "vocab_size"),
    "maxpos": ("maxPositionEmbeddings", "max_position_embeddings"),
}
PRESET_TABLE = lit(
    {p: [getattr(a, attr) for _, attr in _ARCH_FIELDS.values()] for p, a in PRESETS.items()}
)

# kvReplicator candidates its message lists: a valid one divides the tensor degree, and the nxd
# checks reach it only for degrees inside a node (larger ones are refused as spanning nodes, or
# not dividing the world), so up to the largest processesPerNode the schema allows.
_PPN_MAX: int = next(
    m.le for m in _field_info("cluster.processesPerNode").metadata if hasattr(m, "le")
)
REP_CANDIDATES = lit(list(range(1, min(_PPN_MAX, MAX_PARALLEL) + 1)))

# --- the terms validate_layout computes first, as CEL variables -----------------------------------
# The API server has no cel.bind, so each term a rule uses is bound once with a one-element
# comprehension, [value].all(name, body), rather than spelled out wherever it appears (which made
# the CRD several times larger). A rule binds only the terms it uses and what those use, in this
# order. Each value must be safe to compute for any spec (no division by a field that may be 0):
# a bound value is computed before the guard in the body that would have skipped it.
TERMS: dict[str, str] = {
    "it": get("cluster.instanceType"),
    "nodes": get("cluster.nodes"),
    "ppn": get("cluster.processesPerNode", f"{CORES}[it]"),  # unset: one rank per core
    "world": "nodes * ppn",
    "bf": get("backend"),
    "be": f"(bf == 'auto' ? {DEFAULT_BACKEND}[it] : bf)",  # plan.resolve_backend
    "fam": f"{FAMILY}[it]",
    "trn": f"it in {TRAINIUM}",
    "dev": get("device"),
    "tp": get("parallelism.tensor"),
    "pp": get("parallelism.pipeline"),
    "vpp": get("parallelism.virtualPipeline"),
    "rep": get("parallelism.kvReplicator"),
    "arch": f"{PRESET_TABLE}[{get('model.preset')}]",
    **{
        short: get(f"model.{name}", f"arch[{i}]")
        for i, (short, (name, _)) in enumerate(_ARCH_FIELDS.items())
    },
    "seq": get("data.seqLength"),
    "mbs": get("batch.microBatchSize"),
    "gbs": get("batch.globalBatchSize"),
    "dp": "world / (tp * pp)",
    "unit": "mbs * dp",
    # validate_layout returns after a tensor degree, then a pipeline degree, that does not divide
    # the world size: the checks after those run only when both divide (and so do their rules).
    "divides": "world % tp == 0",
    "layout": "divides && (world / tp) % pp == 0",
    # The elif chain of tensor checks in validate_layout, condition by condition.
    "trn1bad": f"be == 'nxd' && fam == 'trn1' && !(tp in {TRN1_DEGREES})",
    "headsbad": "a % tp != 0",
    "unsplit": "isz % tp != 0 || vsz % tp != 0",
    "group": "a % kv == 0 ? a / kv : 0",  # query heads per kv head (0: numKvHeads is refused)
}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'")


def _uses(expr: str) -> set[str]:
    # Words inside quoted strings are text ("tensor", "world" in the messages), not terms.
    return {m for m in _IDENT.findall(_QUOTED.sub("''", expr)) if m in TERMS}


def bind(body: str, *, text: bool = False) -> str:
    """``body`` with the terms it uses bound around it: a boolean rule, or (``text``) the
    string of a messageExpression."""
    needed: set[str] = set()
    todo = list(_uses(body))
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(_uses(TERMS[name]))
    out = body
    for name in reversed([n for n in TERMS if n in needed]):
        value = TERMS[name]
        out = f"[{value}].map({name}, {out})[0]" if text else f"[{value}].all({name}, {out})"
    return out


def kv_ok(rep: str) -> str:
    """plan.nxd_kv_replicators' test of one replicator (see there for why each clause)."""
    return (
        f"(tp % {rep} == 0 && (kv * {rep}) % tp == 0 && (group == 0 || group % {rep} == 0)"
        f" && ({rep} == 1 || fam != 'trn2' || kv * {rep} == tp))"
    )


@dataclass(frozen=True)
class Rule:
    """One cross-field check: ``ok`` is true for every spec the Python check accepts."""

    name: str  # what the tests call it
    field: str  # camelCase path under spec: the field the API server names
    ok: str  # CEL over the terms above
    message: str  # static text, for when the messageExpression cannot be evaluated
    text: str  # CEL string over the terms: the message with the numbers and the fix
    python: str  # the Python check it mirrors

    def to_schema(self) -> dict[str, Any]:
        return {
            "rule": bind(self.ok),
            "fieldPath": f".{self.field}",
            "reason": REASON,
            "message": self.message,
            "messageExpression": bind(self.text, text=True),
        }


_BACKEND_WHY = lit(
    {
        "nxd": "NeuronX Distributed needs Trainium",
        "torch": "there is no TorchNeuron on trn1/trn1n, only NeuronX Distributed",
    }
)


def _rules() -> list[Rule]:
    compile_ = get("compile.torchCompile")
    schedule = get("parallelism.pipelineSchedule")
    lr, min_lr = get("optimizer.lr"), get("optimizer.minLr")
    held_out = get("validation.sequences")
    return [
        Rule(
            "backend", "backend",
            f"bf == 'auto' || bf in {BACKENDS}[it]",
            "this backend cannot run on the instance type; use auto",
            message("%s cannot run on %s (%s); use auto or %s",
                    "bf", "it", f"{_BACKEND_WHY}[bf]", f"{BACKENDS_TEXT}[it]"),
            "validate_layout: backend not in inst.backends",
        ),
        Rule(
            "hyperpod", "cluster.hyperpod",
            f"!({get('cluster.hyperpod')} && it in {NOT_HYPERPOD})",
            "not a SageMaker HyperPod instance type; set hyperpod: false (plain EKS)",
            message("%s is not a SageMaker HyperPod instance type, so no node would carry the "
                    "HyperPod labels its pods select; set hyperpod: false (plain EKS)", "it"),
            "validate_layout: hyperpod on a type without the ml. prefix",
        ),
        Rule(
            "device", "device",
            f"dev == 'auto' || dev == {DEVICE}[it]",
            "the instance type trains on another device; use auto",
            message("%s trains on %s, not %s; use auto or %s",
                    "it", f"{DEVICE}[it]", "dev", f"{DEVICE}[it]"),
            "validate_layout: device != inst.device",
        ),
        Rule(
            "processes-per-node", "cluster.processesPerNode",
            f"fam == 'cpu' || ppn <= {CORES}[it]",
            "more ranks than the instance type has devices; lower it",
            message("%d exceeds the %d %s of %s; use %d", "ppn", f"{CORES}[it]",
                    "(trn ? 'NeuronCores' : 'GPUs')", "it", f"{CORES}[it]"),
            "validate_layout: ppn > inst.cores_per_node",
        ),
        Rule(
            "hidden-size", "model.hiddenSize",
            "h % a == 0",
            "hiddenSize must be divisible by numHeads",
            message("%d is not divisible by numHeads %d; use a multiple of %d", "h", "a", "a"),
            "validate_layout: hidden_size % num_heads",
        ),
        Rule(
            "head-dim-even", "model.hiddenSize",
            "h % a != 0 || (h / a) % 2 == 0",
            "hiddenSize / numHeads must be even (RoPE rotates pairs of dimensions)",
            message("%d / numHeads %d gives head dim %d, which is odd; RoPE needs an even head "
                    "dim: use a multiple of %d", "h", "a", "h / a", "2 * a"),
            "ModelSpec._even_head_dim",
        ),
        Rule(
            "kv-heads", "model.numKvHeads",
            "a % kv == 0",
            "numKvHeads must divide numHeads",
            message("%d does not divide numHeads %d; use a divisor of %d", "kv", "a", "a"),
            "validate_layout: num_heads % num_kv_heads",
        ),
        Rule(
            "seq-length", "data.seqLength",
            "seq <= maxpos",
            "seqLength exceeds the model's maxPositionEmbeddings",
            message("%d exceeds the model's maxPositionEmbeddings %d; use at most that",
                    "seq", "maxpos"),
            "validate_layout: seq_length > max_position_embeddings",
        ),
        Rule(
            "tensor-world", "parallelism.tensor",
            "divides",
            "the tensor degree must divide the world size (nodes x processesPerNode)",
            message("%d does not divide the world size %d (%d node(s) x %d processes); use a "
                    "divisor of %d", "tp", "world", "nodes", "ppn", "world"),
            "validate_layout: world % tp",
        ),
        Rule(
            "pipeline-world", "parallelism.pipeline",
            "!divides || layout",
            "tensor x pipeline must divide the world size",
            message("tensor %d x pipeline %d does not divide the world size %d; use a divisor "
                    "of %d", "tp", "pp", "world", "world / tp"),
            "validate_layout: (world // tp) % pp",
        ),
        Rule(
            "tensor-node", "parallelism.tensor",
            "!layout || !(trn && tp > ppn)",
            "tensor-parallel groups must stay inside one node",
            message("%d spans nodes; tensor-parallel groups must stay inside one node of %d "
                    "cores; use a divisor of %d", "tp", "ppn", "ppn"),
            "validate_layout: trainium and tp > ppn",
        ),
        Rule(
            "tensor-trn1", "parallelism.tensor",
            "!layout || !(trn1bad && tp <= ppn)",
            "not a tensor-parallel degree NxD runs on trn1; use 1, 2, 4, 8 or 32",
            message("%d is not a tensor-parallel degree NxD runs on %s: the Neuron runtime there "
                    "runs tensor groups of %s NeuronCores (16 fails at start-up with a "
                    "replica-group error); use one of %s", "tp", "it",
                    lit(", ".join(map(str, NXD_TRN1_TENSOR_DEGREES))),
                    f"{TRN1_DEGREES}.filter(d, world % d == 0 && d <= ppn)"),
            "validate_layout: nxd on trn1 and tp not in NXD_TRN1_TENSOR_DEGREES",
        ),
        Rule(
            "tensor-heads", "parallelism.tensor",
            "!layout || trn1bad || !headsbad",
            "the tensor degree must divide the attention heads",
            message("%d does not divide the %d attention heads; use a divisor of %d",
                    "tp", "a", "a"),
            "validate_layout: num_heads % tp",
        ),
        Rule(
            "tensor-split", "parallelism.tensor",
            "!layout || trn1bad || headsbad || !unsplit",
            "the tensor degree must divide intermediateSize and vocabSize",
            message("%d does not divide model.%s %d (both backends shard the MLP and the "
                    "vocabulary evenly); use a divisor of it that divides the heads",
                    "tp", "(isz % tp != 0 ? 'intermediateSize' : 'vocabSize')",
                    "(isz % tp != 0 ? isz : vsz)"),
            "validate_layout: intermediate_size or vocab_size % tp",
        ),
        Rule(
            "kv-replicator-nxd", "parallelism.kvReplicator",
            f"!layout || trn1bad || headsbad || unsplit || be != 'nxd' || {kv_ok('rep')}",
            "kvReplicator does not fit the tensor degree and the kv heads under nxd",
            message("%d does not work at tensor %d with %d kv heads and %d query heads on %s "
                    "(it must divide the tensor degree and the query heads per kv head, and "
                    "numKvHeads x kvReplicator must be a multiple of tensor, on trn2 equal to "
                    "it); use one of %s (none: lower parallelism.tensor)",
                    "rep", "tp", "kv", "a", "fam", f"{REP_CANDIDATES}.filter(r, {kv_ok('r')})"),
            "validate_layout: _nxd_kv_problem",
        ),
        Rule(
            "tensor-kv-torch", "parallelism.tensor",
            "!layout || trn1bad || headsbad || unsplit || be == 'nxd' || kv % tp == 0",
            "the tensor degree must divide the kv heads on the torch backend",
            message("%d does not divide the %d kv heads (the torch backend does not replicate "
                    "kv heads); use a divisor of %d", "tp", "kv", "kv"),
            "validate_layout: num_kv_heads % tp (torch)",
        ),
        Rule(
            "kv-replicator-torch", "parallelism.kvReplicator",
            "!layout || !(be == 'torch' && rep != 1)",
            "only the nxd backend replicates kv heads; use 1",
            message("%d: only the nxd backend replicates kv heads; use 1", "rep"),
            "validate_layout: torch and kv_replicator != 1",
        ),
        Rule(
            "torch-compile-nxd", "compile.torchCompile",
            f"!layout || !({compile_} && be == 'nxd')",
            "applies to the torch backend; use false",
            message("applies to the torch backend; on Trainium the compile step compiles the "
                    "graphs with neuron_parallel_compile; use false"),
            "validate_layout: torch_compile and nxd",
        ),
        Rule(
            "torch-compile-tensor", "compile.torchCompile",
            f"!layout || !({compile_} && be != 'nxd' && tp > 1)",
            "does not combine with tensor parallelism; use tensor 1 with fsdp, or false",
            message("does not combine with parallelism.tensor %d on the torch backend (torch "
                    "2.13 fails to compile tensor-parallel blocks); use tensor 1 with fsdp, or "
                    "false", "tp"),
            "validate_layout: torch_compile and tp > 1",
        ),
        Rule(
            "pipeline-layers", "parallelism.pipeline",
            "!layout || l % pp == 0",
            "the pipeline degree must divide the layers",
            message("%d does not divide the %d layers; use a divisor of %d", "pp", "l", "l"),
            "validate_layout: num_layers % pp",
        ),
        Rule(
            "virtual-pipeline-layers", "parallelism.virtualPipeline",
            "!layout || l % pp != 0 || l % (pp * vpp) == 0",
            "pipeline x virtualPipeline must divide the layers",
            message("pipeline %d x virtualPipeline %d does not divide the %d layers; use a "
                    "divisor of %d", "pp", "vpp", "l", "l / pp"),
            "validate_layout: num_layers % (pp * vpp)",
        ),
        Rule(
            "virtual-pipeline-needs-pipeline", "parallelism.virtualPipeline",
            "!layout || !(vpp > 1 && pp == 1)",
            "needs pipeline > 1; use 1",
            message("%d needs pipeline > 1; use 1", "vpp"),
            "validate_layout: vpp > 1 and pp == 1",
        ),
        Rule(
            "pipeline-schedule", "parallelism.pipelineSchedule",
            f"!layout || !(vpp > 1 && {schedule} != 'Interleaved1F1B' && be == 'torch')",
            "virtualPipeline > 1 needs Interleaved1F1B",
            message("virtualPipeline %d needs Interleaved1F1B; use that", "vpp"),
            "validate_layout: vpp > 1 and schedule != Interleaved1F1B (torch)",
        ),
        Rule(
            "global-batch", "batch.globalBatchSize",
            "!layout || gbs % unit == 0",
            "globalBatchSize must be a multiple of microBatchSize x data parallel",
            message("%d is not divisible by microBatchSize %d x data parallel %d = %d; use a "
                    "multiple of %d", "gbs", "mbs", "dp", "unit", "unit"),
            "validate_layout: gbs % (mbs * dp)",
        ),
        Rule(
            "global-batch-pipeline", "batch.globalBatchSize",
            "!layout || gbs % unit != 0 || pp == 1 || gbs / unit >= pp",
            "a pipeline needs at least as many micro-batches per step as stages",
            message("pipeline %d needs at least %d micro-batches per step but %d / (%d x %d) = "
                    "%d; use at least %d", "pp", "pp", "gbs", "mbs", "dp", "gbs / unit",
                    "pp * unit"),
            "validate_layout: gbs // unit < pp",
        ),
        Rule(
            "min-lr", "optimizer.minLr",
            f"{min_lr} <= {lr}",
            "minLr must not exceed lr",
            message("%s must not exceed lr %s; lower minLr", min_lr, lr),
            "OptimizerSpec._lr_order",
        ),
        Rule(
            "validation-sequences", "validation.sequences",
            f"{held_out} % gbs == 0",
            "validation.sequences must be a multiple of batch.globalBatchSize",
            message("%d is not a multiple of batch.globalBatchSize %d (validation runs whole "
                    "global batches); use a multiple of %d", held_out, "gbs", "gbs"),
            "TrainingSpec._length",
        ),
    ]


RULES: tuple[Rule, ...] = tuple(_rules())
# Fields some rule can name; a Python error on any other field is the operator's alone.
FIELDS: frozenset[str] = frozenset(f"spec.{r.field}" for r in RULES)


def validations() -> list[dict[str, Any]]:
    """The x-kubernetes-validations of the CRD's spec node."""
    return [r.to_schema() for r in RULES]
