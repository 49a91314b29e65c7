"""The Llama model: numerics against Hugging Face, name mapping, init, pipeline-stage contract."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import transformers
from llamajob_trainer.hf import hf_config
from llamajob_trainer.model import (
    Llama,
    block_causal_attention,
    from_hf_state_dict,
    init_tensor,
    loss_sum,
    to_hf_state_dict,
)
from llamajob_trainer.presets import PRESETS, Architecture

TINY = PRESETS["tiny"]  # GQA: 4 query heads, 2 kv heads
TIED = Architecture(64, 2, 4, 1, 160, 300, 500000.0, 256, tie_embeddings=True)


def hf_model(arch: Architecture) -> torch.nn.Module:
    config = transformers.LlamaConfig(**hf_config(arch, "float32"), attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).float().eval()


def our_model(arch: Architecture, seed: int = 3) -> Llama:
    model = Llama(arch)
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("arch", [TINY, TIED], ids=["gqa", "tied"])
def test_logits_match_hugging_face(arch: Architecture) -> None:
    ours = our_model(arch)
    hf = hf_model(arch)
    result = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), arch), strict=False)
    # A tied model's file has no lm_head; HF ties it to the embedding itself.
    assert result.unexpected_keys == []
    assert result.missing_keys == (["lm_head.weight"] if arch.tie_embeddings else [])
    tokens = torch.randint(0, arch.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = ours(tokens)
    assert actual.shape == (2, 37, arch.vocab_size)
    assert expected.abs().max() > 0.01  # not trivially zero
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", [TINY, TIED], ids=["gqa", "tied"])
def test_hf_round_trip_is_lossless(arch: Architecture) -> None:
    sd = our_model(arch).state_dict()
    hf_sd = to_hf_state_dict(sd, arch)
    assert ("lm_head.weight" in hf_sd) is (not arch.tie_embeddings)
    assert "model.layers.1.self_attn.k_proj.weight" in hf_sd
    assert "model.layers.0.mlp.gate_proj.weight" in hf_sd
    back = from_hf_state_dict(hf_sd, arch)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_from_hf_rejects_a_mismatched_checkpoint() -> None:
    hf_sd = to_hf_state_dict(our_model(TINY).state_dict(), TINY)
    fewer_layers = dataclasses.replace(TINY, num_layers=2)
    with pytest.raises(KeyError, match=r"model\.layers\.2"):
        from_hf_state_dict(hf_sd, fewer_layers)
    del hf_sd["model.norm.weight"]
    with pytest.raises(KeyError, match=r"norm\.weight"):
        from_hf_state_dict(hf_sd, TINY)


@pytest.mark.parametrize("name", ["tiny", "llama3-8b", "llama3.2-1b", "llama2-70b"])
def test_parameter_count_matches_architecture(name: str) -> None:
    arch = PRESETS[name]
    with torch.device("meta"):  # shapes only: no memory for the big ones
        model = Llama(arch, max_seq_len=16)
    assert sum(p.numel() for p in model.parameters()) == arch.num_params()


def test_tied_output_is_the_embedding() -> None:
    model = our_model(TIED)
    assert model.output is not None and model.tok_embeddings is not None
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" in model.state_dict()


def test_init_depends_on_seed_and_name_only() -> None:
    full = our_model(TINY, seed=11)
    # A pipeline stage built alone (meta, prune, materialise) gets the same values.
    with torch.device("meta"):
        stage = Llama(TINY)
    del stage.layers["0"], stage.layers["1"]
    stage.tok_embeddings = None
    stage.to_empty(device="cpu")
    stage.init_weights(11)
    for key, value in stage.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key
    torch.testing.assert_close(stage.rope_cos, full.rope_cos)
    wq, wo = full.layers["0"].attention.wq.weight, full.layers["0"].attention.wo.weight
    assert not torch.equal(our_model(TINY, seed=12).layers["0"].attention.wq.weight, wq)
    assert wo.std() < 0.7 * wq.std()  # residual-stream projections start depth-scaled


def test_tied_output_alone_starts_equal_to_the_embedding() -> None:
    emb = init_tensor(TIED, 5, "tok_embeddings.weight", (300, 64))
    out = init_tensor(TIED, 5, "output.weight", (300, 64))
    assert torch.equal(emb, out)
    untied = dataclasses.replace(TIED, tie_embeddings=False)
    assert not torch.equal(init_tensor(untied, 5, "output.weight", (300, 64)), emb)


def test_stages_compose_to_the_full_model() -> None:
    full = our_model(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    first, last = our_model(TINY), our_model(TINY)
    del first.layers["2"], first.layers["3"]
    first.norm = first.output = None
    del last.layers["0"], last.layers["1"]
    last.tok_embeddings = None
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.dtype == torch.float32 and hidden.shape == (2, 16, TINY.hidden_size)
        torch.testing.assert_close(last(hidden), full(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_keeps_gradients(mode: str) -> None:
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.roll(tokens, -1, dims=1)

    def grads(model: Llama) -> dict[str, torch.Tensor]:
        model.train()
        loss_sum(model(tokens), labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(our_model(TINY))
    model = our_model(TINY)
    for block in model.layers.values():
        block.recompute = mode == "full"
        block.attention.recompute_core = mode == "selective"
    recomputed = grads(model)
    assert set(recomputed) == set(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-5)


def test_loss_sum_ignores_masked_labels() -> None:
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[1, 2, -100, 3]])
    keep = torch.tensor([0, 1, 3])
    expected = torch.nn.functional.cross_entropy(logits[0, keep], labels[0, keep], reduction="sum")
    torch.testing.assert_close(loss_sum(logits, labels), expected)


@pytest.mark.parametrize(
    ("seq", "block", "dtype"),
    [(64, 16, torch.float32), (50, 16, torch.float32), (7, 16, torch.float32),
     (64, 16, torch.bfloat16)],
    ids=["blocks", "ragged-last-block", "one-short-block", "bf16"],
)
def test_block_causal_attention_matches_sdpa(seq: int, block: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, seq, 16, generator=gen).to(dtype).requires_grad_()
               for h in (6, 2, 2))
    grad_out = torch.randn(2, 6, seq, 16, generator=gen).to(dtype)

    def run(fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        out = fn()
        return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]

    ours = run(lambda: block_causal_attention(q, k, v, block))
    ref = run(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    for got, want in zip(ours, ref, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize(("seq", "blocked"), [(64, True), (768, False)])
def test_compiled_cpu_attention_skips_masked_blocks_below_the_flash_threshold(
    monkeypatch: pytest.MonkeyPatch, seq: int, blocked: bool
) -> None:
    import llamajob_trainer.model as model_module

    calls: list[int] = []
    real = model_module.block_causal_attention

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
        calls.append(block)
        return real(q, k, v, block)

    monkeypatch.setattr(model_module, "block_causal_attention", recording)
    q, k, v = (torch.randn(1, h, seq, 8) for h in (4, 2, 2))
    eager = model_module._attention_core(q, k, v)
    assert calls == []  # eager keeps PyTorch's kernel
    torch._dynamo.reset()
    compiled = torch.compile(model_module._attention_core, backend="eager")(q, k, v)
    assert bool(calls) is blocked
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
