"""The instance catalogue: every entry consistent with itself, and the sourced figures pinned.

The tables here repeat the figures of operator/llamajob/catalogue.py on purpose: a changed
figure must be changed in both places, with its source, not slip in with an unrelated edit.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from llamajob.api import InstanceTypeName
from llamajob.catalogue import (
    EFA_RESOURCE,
    GPU_RESOURCE,
    INSTANCE_TYPE_NAMES,
    INSTANCE_TYPES,
    NEURON_RESOURCE,
    InstanceType,
)
from llamajob.crd import crd

ROOT = Path(__file__).resolve().parent.parent
ALL = sorted(INSTANCE_TYPES)

# Physical NeuronCores per chip (Neuron docs: Trainium, Trainium2 and Trainium3 Architecture).
PHYSICAL_CORES_PER_CHIP = {"trainium": 2, "trainium2": 8, "trainium3": 8}

# Dense BF16 TFLOPS per chip or GPU, as the vendors state it (sources in the catalogue).
PEAK_PER_DEVICE = {
    "trainium": 190.0,
    "trainium2": 667.0,
    "trainium3": 671.0,
    "nvidia-a10g": 70.0,
    "nvidia-l40s": 362.05,
    "nvidia-a100-40gb": 312.0,
    "nvidia-a100-80gb": 312.0,
    "nvidia-h100": 989.5,
    "nvidia-h200": 989.5,
    "nvidia-b200": 2250.0,
}

# Device memory per node as the source states it: GiB per instance from the Neuron
# architecture pages; MiB per instance (TotalGpuMemoryInMiB) from EC2 for the GPU types.
NODE_DEVICE_MEMORY_GIB = {
    "ml.trn1.32xlarge": 512,
    "ml.trn1n.32xlarge": 512,
    "ml.trn2.48xlarge": 1536,
    "trn3.48xlarge": 16 * 144,  # the Trn3 page gives 144 GiB per chip, 16 chips a server
}
NODE_DEVICE_MEMORY_MIB = {
    "ml.g5.8xlarge": 22888,
    "ml.g5.12xlarge": 91552,
    "ml.g5.24xlarge": 91552,
    "ml.g5.48xlarge": 8 * 22888,
    "ml.g6e.8xlarge": 45776,
    "ml.g6e.12xlarge": 183104,
    "ml.g6e.24xlarge": 183104,
    "ml.g6e.48xlarge": 8 * 45776,
    "ml.p4d.24xlarge": 327680,
    "ml.p4de.24xlarge": 655360,
    "ml.p5.48xlarge": 655360,
    "ml.p5e.48xlarge": 1155072,
    "ml.p5en.48xlarge": 1155072,
    "ml.p6-b200.48xlarge": 1466872,
}

# name: (chips or GPUs, ranks, GiB per rank, dense BF16 TFLOPS per node, EFA devices, $/hour)
KEY_FIGURES: dict[str, tuple[int, int, float, float, int, float]] = {
    "ml.trn1.32xlarge": (16, 32, 16.0, 3040.0, 8, 21.50),
    "ml.trn1n.32xlarge": (16, 32, 16.0, 3040.0, 16, 24.78),
    "ml.trn2.48xlarge": (16, 64, 24.0, 10672.0, 16, 35.76),  # price: us-east-2
    "trn3.48xlarge": (16, 64, 36.0, 10736.0, 16, 0.0),  # EFA count unconfirmed, no price
    "ml.g5.8xlarge": (1, 1, 22888 / 1024, 70.0, 1, 2.448),
    "ml.g5.12xlarge": (4, 4, 22888 / 1024, 280.0, 1, 5.672),
    "ml.g5.24xlarge": (4, 4, 22888 / 1024, 280.0, 1, 8.144),
    "ml.g5.48xlarge": (8, 8, 22888 / 1024, 560.0, 1, 16.288),
    "ml.g6e.8xlarge": (1, 1, 45776 / 1024, 362.05, 1, 4.52856),
    "ml.g6e.12xlarge": (4, 4, 45776 / 1024, 1448.2, 1, 10.49264),
    "ml.g6e.24xlarge": (4, 4, 45776 / 1024, 1448.2, 2, 15.06559),
    "ml.g6e.48xlarge": (8, 8, 45776 / 1024, 2896.4, 4, 30.13118),
    "ml.p4d.24xlarge": (8, 8, 40.0, 2496.0, 4, 21.957642),
    "ml.p4de.24xlarge": (8, 8, 80.0, 2496.0, 4, 27.44705),
    "ml.p5.48xlarge": (8, 8, 80.0, 7916.0, 32, 55.04),
    "ml.p5e.48xlarge": (8, 8, 141.0, 7916.0, 32, 0.0),  # Capacity Blocks only
    "ml.p5en.48xlarge": (8, 8, 141.0, 7916.0, 16, 63.296),
    "ml.p6-b200.48xlarge": (8, 8, 183359 / 1024, 18000.0, 8, 113.9328),
    "cpu": (0, 2, 4.0, 0.2, 0, 0.0),
}


def test_the_table_covers_the_catalogue() -> None:
    assert sorted(KEY_FIGURES) == ALL


@pytest.mark.parametrize("name", ALL)
def test_key_figures(name: str) -> None:
    inst = INSTANCE_TYPES[name]
    ours = (
        inst.devices_per_node,
        inst.cores_per_node,
        inst.memory_per_core_gib,
        inst.peak_tflops_per_node,
        inst.efa_devices,
        inst.price_per_hour,
    )
    expected = KEY_FIGURES[name]
    assert ours[:2] == expected[:2]
    assert ours[4] == expected[4]
    for got, want in zip(ours[2:4] + ours[5:], expected[2:4] + expected[5:], strict=True):
        assert math.isclose(got, want, rel_tol=1e-9), (name, ours, expected)


def test_names_are_the_keys_and_hyperpod_names() -> None:
    for key, inst in INSTANCE_TYPES.items():
        assert inst.name == key
    # SageMaker HyperPod spells every type ml.<EC2 name>; Trainium3 has no HyperPod type and
    # "cpu" is no instance type at all.
    assert sorted(n for n in INSTANCE_TYPES if not n.startswith("ml.")) == ["cpu", "trn3.48xlarge"]
    for name in INSTANCE_TYPES:
        ec2 = name.removeprefix("ml.")
        assert name == "cpu" or re.fullmatch(r"[a-z0-9-]+\.\d*xlarge", ec2), name


def test_the_spec_enum_is_the_catalogue_in_order() -> None:
    assert InstanceTypeName.__args__ == INSTANCE_TYPE_NAMES
    cluster = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    enum = cluster["properties"]["cluster"]["properties"]["instanceType"]["enum"]
    assert tuple(enum) == INSTANCE_TYPE_NAMES


@pytest.mark.parametrize("name", ALL)
def test_entry_is_self_consistent(name: str) -> None:
    inst = INSTANCE_TYPES[name]
    assert inst.cores_per_node > 0
    assert inst.memory_per_core_gib > 0
    assert inst.peak_tflops_per_core > 0
    assert math.isfinite(inst.price_per_hour) and inst.price_per_hour >= 0
    assert inst.backends and len(set(inst.backends)) == len(inst.backends)
    assert set(inst.backends) <= {"torch", "nxd"}
    assert inst.backend == inst.backends[0]
    # A type with EFA requests it; one without must not, or no node would ever fit the pod.
    expected_efa_resource = EFA_RESOURCE if inst.efa_devices > 0 else None
    assert inst.efa_resource == expected_efa_resource
    assert inst.efa_devices >= 0


@pytest.mark.parametrize("name", [n for n in ALL if INSTANCE_TYPES[n].trainium])
def test_trainium_entries(name: str) -> None:
    inst = INSTANCE_TYPES[name]
    family_of = {"trainium": "trn1", "trainium2": "trn2", "trainium3": "trn3"}
    assert inst.family == family_of[inst.accelerator]
    assert inst.device == "neuron"
    assert inst.device_resource == NEURON_RESOURCE
    physical = inst.devices_per_node * PHYSICAL_CORES_PER_CHIP[inst.accelerator]
    if inst.family == "trn1":
        # No logical cores on NeuronCore-v2, and torch-xla (NxD) is the only stack there.
        assert inst.lnc is None
        assert inst.backends == ("nxd",)
        assert inst.cores_per_node == physical
    else:
        assert inst.lnc == 2  # the default logical NeuronCore size
        assert inst.cores_per_node == physical // inst.lnc
        assert inst.backend == "torch"  # TorchNeuron
    if inst.family == "trn3":
        assert inst.backends == ("torch",)  # NxD training never had a trn3 backend
    # Whole chips per device-plugin request: render divides ranks by cores per chip.
    assert inst.cores_per_node % inst.devices_per_node == 0


@pytest.mark.parametrize("name", [n for n in ALL if INSTANCE_TYPES[n].family == "gpu"])
def test_gpu_entries(name: str) -> None:
    inst = INSTANCE_TYPES[name]
    assert inst.accelerator in PEAK_PER_DEVICE and inst.accelerator.startswith("nvidia-")
    assert inst.device == "cuda"
    assert inst.backends == ("torch",)
    assert inst.device_resource == GPU_RESOURCE
    assert inst.cores_per_node == inst.devices_per_node  # one rank per GPU
    assert inst.lnc is None
    assert not inst.trainium


def test_cpu_entry() -> None:
    inst = INSTANCE_TYPES["cpu"]
    assert (inst.family, inst.accelerator, inst.device, inst.backends) == (
        "cpu",
        "cpu",
        "cpu",
        ("torch",),
    )
    assert inst.device_resource is None and inst.efa_devices == 0


def test_families_and_devices_agree() -> None:
    device_of = {"trn1": "neuron", "trn2": "neuron", "trn3": "neuron", "gpu": "cuda", "cpu": "cpu"}
    for inst in INSTANCE_TYPES.values():
        assert device_of[inst.family] == inst.device, inst.name


@pytest.mark.parametrize("name", [n for n in ALL if n != "cpu"])
def test_peak_is_per_device_figure_times_devices(name: str) -> None:
    inst = INSTANCE_TYPES[name]
    expected = PEAK_PER_DEVICE[inst.accelerator] * inst.devices_per_node
    assert math.isclose(inst.peak_tflops_per_node, expected, rel_tol=1e-9)


def test_instance_totals_match_the_architecture_pages() -> None:
    # trn1: 3,040 TFLOPS; trn2: "10.7" PFLOPS (16 x 667, rounded); trn3: a Gen1 UltraServer's
    # 42,944 TFLOPS over its 4 servers.
    assert INSTANCE_TYPES["ml.trn1.32xlarge"].peak_tflops_per_node == 3040.0
    assert round(INSTANCE_TYPES["ml.trn2.48xlarge"].peak_tflops_per_node / 1000, 1) == 10.7
    assert INSTANCE_TYPES["trn3.48xlarge"].peak_tflops_per_node == 42944 / 4


@pytest.mark.parametrize("name", [n for n in ALL if n != "cpu"])
def test_ranks_times_memory_is_the_node_device_memory(name: str) -> None:
    inst = INSTANCE_TYPES[name]
    total_gib = inst.cores_per_node * inst.memory_per_core_gib
    if name in NODE_DEVICE_MEMORY_GIB:
        assert math.isclose(total_gib, NODE_DEVICE_MEMORY_GIB[name], rel_tol=1e-9)
    else:
        assert math.isclose(total_gib * 1024, NODE_DEVICE_MEMORY_MIB[name], rel_tol=1e-9)


def test_unpriced_types_are_the_known_ones() -> None:
    # 0.0 means "no published on-demand price"; a new zero must be a decision, not an oversight.
    unpriced = sorted(n for n, inst in INSTANCE_TYPES.items() if inst.price_per_hour == 0)
    assert unpriced == ["cpu", "ml.p5e.48xlarge", "trn3.48xlarge"]


def _doc_rows() -> dict[str, str]:
    """The rows of the figures table in docs/instances.md, by instance type."""
    text = (ROOT / "docs" / "instances.md").read_text()
    section = text.split("\n## Figures\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        first = line.strip().strip("|").split("|")[0].strip()
        if line.startswith("|") and first.startswith("`"):
            assert first.strip("`") not in rows, f"docs/instances.md lists {first} twice"
            rows[first.strip("`")] = line
    return rows


def test_docs_list_every_type_with_a_source() -> None:
    rows = _doc_rows()
    assert sorted(rows) == ALL
    for name, line in rows.items():
        if name != "cpu":
            assert "](http" in line, f"docs/instances.md: {name} has no source link"


def test_entries_are_immutable() -> None:
    # Entries are shared by every plan; a plan that edited one would change the next job's.
    inst: InstanceType = INSTANCE_TYPES["ml.p5.48xlarge"]
    with pytest.raises(AttributeError):
        inst.price_per_hour = 1.0  # type: ignore[misc]
