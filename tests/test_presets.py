"""Presets reproduce the published architectures and parameter totals."""

from __future__ import annotations

import pytest
from llamajob.catalogue import INSTANCE_TYPES
from llamajob_trainer.presets import PRESETS, PUBLISHED_PARAMS


def test_every_preset_is_in_the_spec_enum() -> None:
    from llamajob_trainer.config import PresetName

    assert set(PresetName.__args__) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published_total(name: str) -> None:
    ours = PRESETS[name].num_params()
    published = PUBLISHED_PARAMS[name]
    assert abs(ours - published) / published < 0.01, f"{name}: {ours:,} vs {published:,.0f}"


def test_published_architecture_numbers() -> None:
    # The FSDP tutorial's table (Llama 2 7B/13B/70B, 3.1 8B/70B, 3.2 1B).
    expected = {
        "llama2-7b": (11008, 32, 4096, 32, 32),
        "llama2-13b": (13824, 40, 5120, 40, 40),
        "llama2-70b": (28672, 8, 8192, 80, 64),
        "llama3.1-8b": (14336, 8, 4096, 32, 32),
        "llama3.1-70b": (28672, 8, 8192, 80, 64),
        "llama3.2-1b": (8192, 8, 2048, 16, 32),
    }
    for name, (inter, kv, hidden, layers, heads) in expected.items():
        a = PRESETS[name]
        assert (a.intermediate_size, a.num_kv_heads, a.hidden_size, a.num_layers, a.num_heads) == (
            inter,
            kv,
            hidden,
            layers,
            heads,
        ), name


def test_llama3_uses_the_large_rope_base_and_vocab() -> None:
    for name in ("llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.2-1b"):
        assert PRESETS[name].rope_theta == 500000.0
        assert PRESETS[name].vocab_size == 128256


def test_catalogue_figures() -> None:
    trn1 = INSTANCE_TYPES["ml.trn1.32xlarge"]
    assert (trn1.cores_per_node, trn1.memory_per_core_gib, trn1.efa_devices) == (32, 16.0, 8)
    assert trn1.peak_tflops_per_node == 3040.0
    assert INSTANCE_TYPES["ml.trn1n.32xlarge"].efa_devices == 16
    trn2 = INSTANCE_TYPES["ml.trn2.48xlarge"]
    assert trn2.cores_per_node * trn2.memory_per_core_gib == 1536  # 16 chips x 96 GiB
    for inst in INSTANCE_TYPES.values():
        if inst.trainium:
            assert inst.device_resource == "aws.amazon.com/neuron"
            assert inst.efa_resource == "vpc.amazonaws.com/efa"
            # trn3 has no published on-demand price (tests/test_catalogue.py pins which types
            # are unpriced); every other Trainium type has one.
            assert inst.price_per_hour > 0 or inst.family == "trn3"
