"""Rendering the Helm chart with the real Helm engine, and reading what it produced.

helm-python-sdk binds Helm's Go SDK (no `helm` binary needed). Its `Chart.render` does not
expose `--api-versions`/`--kube-version`, but the C library's render call accepts them as
options, so `render` below passes them through the SDK's native call: the chart's
`.Capabilities.APIVersions.Has "monitoring.coreos.com/v1"` gate then sees exactly what
`helm template --api-versions monitoring.coreos.com/v1` would give it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "llamajob"
MONITORING_API = "monitoring.coreos.com/v1"
RELEASE = "llamajob"
NAMESPACE = "llamajob-system"

# Helm's install order (pkg/release/util/kind_sorter.go) for the kinds this chart renders, so
# `kubectl apply` against the real API server sees them in `helm install`'s order.
INSTALL_ORDER = [
    "Namespace", "ServiceAccount", "ConfigMap", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment",
]


# The chart publishes no image and refuses to render without `image.repository`, so every render
# here passes this one unless the test sets its own (or asks for none: `operator_image=False`).
OPERATOR_REPOSITORY = "registry.example/llamajob-operator"


def with_operator_image(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """`values` with `image.repository` set to OPERATOR_REPOSITORY where it is not given."""
    merged = dict(values or {})
    merged["image"] = {"repository": OPERATOR_REPOSITORY, **dict(merged.get("image") or {})}
    return merged


def load_chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render(
    values: Mapping[str, Any] | None = None,
    *,
    api_versions: Iterable[str] = (),
    kube_version: str | None = None,
    namespace: str = NAMESPACE,
    release: str = RELEASE,
    operator_image: bool = True,
) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would print it (with `--set
    image.repository=OPERATOR_REPOSITORY` unless `operator_image` is false)."""
    if operator_image:
        values = with_operator_image(values)
    opts: dict[str, Any] = {"name": release, "namespace": namespace, "is_install": True}
    if api_versions:
        opts["api_versions"] = list(api_versions)
    if kube_version:
        opts["kube_version"] = kube_version
    with load_chart() as chart:
        payload = _native.call_string(
            "helm_render",
            chart._raw(),
            json.dumps(dict(values)) if values is not None else None,
            json.dumps(opts),
        )
    rendered: dict[str, str] = json.loads(payload)
    return rendered


def manifests(rendered: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt and empty documents left out)."""
    objects: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                objects.append(doc)
    return objects


def notes(rendered: Mapping[str, str]) -> str:
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def render_objects(values: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return manifests(render(values, **kwargs))


def chart_crds() -> list[dict[str, Any]]:
    """The CRDs Helm installs from the chart's crds/ directory."""
    docs: list[dict[str, Any]] = []
    for path in sorted((CHART_DIR / "crds").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def of_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kinds(objects: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def install_sorted(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    def rank(obj: dict[str, Any]) -> int:
        kind = obj["kind"]
        return INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)

    return sorted(objects, key=rank)


# --- PromQL: which metrics a query reads -----------------------------------------------------
# Grafana expands these before Prometheus sees a query; any valid duration stands in for them.
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def grafana_to_promql(expr: str) -> str:
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    return expr


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: value}) of every series selector in a PromQL expression.

    Parsed by promql-parser (a real PromQL grammar), so a syntax error fails here rather than
    in Prometheus, and function names, `by (...)` labels or keywords are never mistaken for
    metric names.
    """
    import promql_parser

    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name: m.value for m in node.matchers.matchers}
            name = node.name or labels.get("__name__", "")
            found.append((name, labels))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def exposed_series(registry: Any) -> dict[str, set[str]]:
    """Sample name -> label names for everything a prometheus_client registry exposes.

    Names follow the exposition format, so queries can be checked as written: a counter `x`
    is scraped as `x_total`, a histogram as `x_bucket`, `x_sum` and `x_count`. Label names come
    from the samples present; a labelled metric with no child yet contributes its names only.
    """
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "unknown": ("",),
    }
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        for suffix in suffixes[family.type]:
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            if sample.name in series:
                series[sample.name] |= set(sample.labels) - {"le", "quantile"}
    return series
