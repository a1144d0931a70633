"""Fidelity: our Qwen3 and Qwen3-MoE match transformers' own models on the same checkpoints."""

from __future__ import annotations

import pytest
import torch

from qwen3 import load_model
from qwen3.checkpoint import save_model
from qwen3.layers import NoCache
from qwen3.model import KVCache, Qwen3ForCausalLM, Qwen3MoeForCausalLM, greedy_generate
from tests.reference import load_reference, make_hf_checkpoint, to_official_dialect

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}

# Each case covers a different corner of the architecture; together they cover every option.
CASES = {
    "dense-tied-gqa": dict(moe=False, tie_word_embeddings=True),
    "dense-untied-bias-yarn": dict(moe=False, attention_bias=True, rope_scaling=YARN),
    "dense-mha-theta1e6-sharded": dict(
        moe=False, num_key_value_heads=4, rope_theta=1e6, max_shard_size="100KB"
    ),
    "moe-normtopk": dict(moe=True, norm_topk_prob=True),
    "moe-sparse-step2-mlp-only-tied-bias": dict(
        moe=True,
        norm_topk_prob=False,
        decoder_sparse_step=2,
        mlp_only_layers=[2],
        tie_word_embeddings=True,
        attention_bias=True,
        num_hidden_layers=4,
    ),
    "moe-yarn-sharded-top4": dict(moe=True, num_experts_per_tok=4, rope_scaling=YARN, max_shard_size="200KB"),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    kwargs = dict(CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    return make_hf_checkpoint(folder, **kwargs)


def test_logits_match_transformers(checkpoint):
    ours, ref = load_model(checkpoint, progress=False), load_reference(checkpoint)
    ids = torch.randint(0, ref.config.vocab_size, (3, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_with_kv_cache_equals_transformers_generate(checkpoint):
    ours, ref = load_model(checkpoint, progress=False), load_reference(checkpoint)
    ids = torch.randint(0, ref.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    got = greedy_generate(ours, ids, max_new_tokens=32)
    assert got.tolist() == expected.tolist()


def test_incremental_decoding_equals_full_forward(checkpoint):
    """Prefill in two chunks then token by token through the cache = one full forward."""
    model = load_model(checkpoint, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=24, dtype=model.dtype, device="cpu")
        parts = [model(ids[:, :10], backend=cache), model(ids[:, 10:16], backend=cache)]
        parts += [model(ids[:, i : i + 1], backend=cache) for i in range(16, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 24


def test_official_dialect_config_loads_the_same_model(checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "official"
    shutil.copytree(checkpoint, copy)
    to_official_dialect(copy)
    a, b = load_model(checkpoint, progress=False), load_model(copy, progress=False)
    assert a.config == b.config
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)
    ref = load_reference(copy)  # transformers reads the old dialect too; still the same logits
    with torch.no_grad():
        torch.testing.assert_close(b(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_model_classes_and_moe_layers(checkpoint):
    model = load_model(checkpoint, progress=False)
    config = model.config
    assert isinstance(model, Qwen3MoeForCausalLM if config.is_moe else Qwen3ForCausalLM)
    sparse = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert sparse == [config.is_sparse_layer(i) for i in range(config.num_hidden_layers)]
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_save_model_round_trips_through_transformers(checkpoint, tmp_path):
    ours = load_model(checkpoint, progress=False)
    save_model(ours, tmp_path / "resaved", max_shard_bytes=150_000)
    again, ref = load_model(tmp_path / "resaved", progress=False), load_reference(tmp_path / "resaved")
    ids = torch.arange(30).view(1, 30) % ours.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)
        torch.testing.assert_close(ref(ids).logits, ours(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("moe", [False, True])
def test_half_precision_tracks_transformers(tmp_path, dtype, moe):
    folder = make_hf_checkpoint(tmp_path / "ckpt", moe=moe)
    ours, ref = load_model(folder, dtype=dtype, progress=False), load_reference(folder, dtype=dtype)
    assert ours.dtype == dtype and all(p.dtype == dtype for p in ours.parameters())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, expected = ours(ids).float(), ref(ids).logits.float()
    # Same ops in the same order as the reference; allow a few low-precision ulps of drift.
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() > 0.9


def test_checkpoint_dtype_is_kept_when_dtype_is_none(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "fp32")
    bf16 = load_model(folder, dtype="bfloat16", progress=False)
    save_model(bf16, tmp_path / "bf16")
    model = load_model(tmp_path / "bf16", progress=False)
    assert model.dtype == torch.bfloat16
    for a, b in zip(model.parameters(), bf16.parameters(), strict=True):
        assert torch.equal(a, b)  # bit for bit


def test_no_cache_backend_is_default_and_batch_rows_independent(checkpoint):
    model = load_model(checkpoint, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        both = model(ids, backend=NoCache())
        alone = model(ids[1:])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
