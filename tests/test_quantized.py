"""Quantized weights: GGUF blocks repacked losslessly, the int8 kernels' arithmetic, batch invariance, MoE,
and whole models loaded from quantized files (kept quantized) against the float32 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen3 import kernels, load_model
from qwen3.config import Qwen3Config
from qwen3.gguf_checkpoint import GGUFCheckpoint, save_gguf
from qwen3.gguf_random import random_blocks, write_random_gguf
from qwen3.llm import default_model_dir
from qwen3.quantized import FORMATS, QuantizedEmbedding, reconstruct, repack
from qwen3.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not kernels.kernels_available(), reason="qwen3's CPU kernels did not build")


def blocks(kind: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random blocks: legacy types quantized from N(0, 0.02) by gguf itself, K types random codes."""
    rng = np.random.default_rng(seed)
    if kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        w = rng.normal(0, 0.02, shape).astype(np.float32)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    return random_blocks(kind, shape, rng)


def dequantized(kind: str, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape))


def emulated(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """The kernel's arithmetic in float64: x rounded to int8 per row and ``block`` values (dx = max|x| / 127)."""
    x = x.float().view(x.shape[0], -1, block)
    amax = x.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(x * inv).clamp(-127, 127)
    return (codes.double() * (amax / 127).double()).reshape(x.shape[0], -1) @ w.double().T


# bits a weight takes in the kernel's layout (the file's: Q8_0 8.5, Q4_0 4.5, Q4_K 4.5, Q6_K 6.56, Q2_K 2.63)
BITS_HELD = {
    "Q8_0": 8.5, "Q5_0": 8.5, "Q5_1": 9.0, "Q4_0": 5.0, "Q4_1": 5.0, "Q4_K": 4.625, "Q5_K": 8.625,
    "Q6_K": 8.5625, "Q3_K": 5.125, "Q2_K": 5.125,
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_repacking_is_lossless(kind):
    """reconstruct(repack(blocks)) is bit for bit gguf.quants.dequantize, rows not a multiple of 8 too."""
    rows, k = 44, 512
    data = blocks(kind, (rows, k))
    weight = repack(kind, data, rows, k)
    assert weight.fmt == FORMATS[kind] and weight.parts[0].shape == (1, 6, k * weight.fmt[0])
    assert torch.equal(reconstruct(weight)[0], dequantized(kind, data, (rows, k)))
    held_bits = 8 * weight.nbytes / (48 * k)  # per weight, rows padded to 48
    assert held_bits == BITS_HELD[kind], held_bits


@pytest.mark.parametrize("kind", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_computes_the_documented_integer_arithmetic(kind, dtype):
    rows, k = 40, 768
    data = blocks(kind, (rows, k), seed=1)
    weight = repack(kind, data, rows, k)
    w = dequantized(kind, data, (rows, k))
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = kernels.quant_linear(x, weight)
    assert y.dtype == dtype and y.shape == (7, rows)
    bits, block, sup = FORMATS[kind]
    expected = emulated(x.float(), w, 32 if sup == block else sup)  # K types: one activation scale per 256
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # fp32 accumulation; bf16: rounding of the output
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < tol
    exact = x.float() @ w.T  # and close to the unquantized product (int8 activations cost ~0.5%)
    assert ((y.float() - exact).norm() / exact.norm()).item() < 0.02


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q6_K", "Q3_K"])
def test_rows_are_batch_invariant(kind):
    """Each output row is the same bits whatever other rows share the call (any tile, any thread split)."""
    rows, k = 64, 512
    weight = repack(kind, blocks(kind, (rows, k), seed=3), rows, k)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(4), dtype=torch.float32).bfloat16()
    full = kernels.quant_linear(x, weight)
    for m in (1, 2, 3, 5, 9):
        assert torch.equal(kernels.quant_linear(x[:m], weight), full[:m])
    assert torch.equal(kernels.quant_linear(x[6:7], weight), full[6:7])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.quant_linear(x, weight), full)
    finally:
        torch.set_num_threads(threads)


def test_fused_gate_up_and_row_blocks():
    k, n = 256, 48
    gate = repack("Q4_K", blocks("Q4_K", (n, k), seed=5), n, k)
    up = repack("Q4_K", blocks("Q4_K", (n, k), seed=6), n, k)
    x = torch.randn(5, k)
    fused = kernels.quant_gate_up_silu(x, kernels.interleave_gate_up(gate, up))
    torch.testing.assert_close(fused, F.silu(kernels.quant_linear(x, gate)) * kernels.quant_linear(x, up))
    both = kernels.concat_quant_rows([gate, up])
    assert torch.equal(
        kernels.quant_linear(x, both), torch.cat([kernels.quant_linear(x, w) for w in (gate, up)], -1)
    )
    assert torch.equal(kernels.quant_linear(x, both.rows(n, 2 * n)), kernels.quant_linear(x, up))
    with pytest.raises(ValueError, match="one format"):
        kernels.concat_quant_rows([gate, repack("Q8_0", blocks("Q8_0", (n, k)), n, k)])


@pytest.mark.parametrize("kinds", [("Q4_K", "Q6_K"), ("Q8_0", "Q8_0")])
def test_moe_experts_are_read_in_place(kinds):
    """quant_moe = the routed sum of each chosen expert's SwiGLU, token by token, and batch-invariant."""
    e, ff, h, top_k = 6, 256, 256, 3
    gate = repack(kinds[0], blocks(kinds[0], (e, ff, h), seed=7), ff, h)
    up = repack(kinds[0], blocks(kinds[0], (e, ff, h), seed=8), ff, h)
    down = repack(kinds[1], blocks(kinds[1], (e, h, ff), seed=9), h, ff)
    gate_up = kernels.interleave_gate_up(gate, up)
    assert gate_up.experts == down.experts == e
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(9, h, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(9)])
    weights = torch.rand(9, top_k, generator=gen).bfloat16()
    y = kernels.quant_moe(x, gate_up, down, ids, weights)
    expected = torch.zeros(9, h)
    for t in range(9):
        for j in range(top_k):
            i = int(ids[t, j])
            hidden = kernels.quant_gate_up_silu(x[t : t + 1].float(), gate_up.expert(i))
            expected[t] += weights[t, j].float() * kernels.quant_linear(hidden, down.expert(i))[0]
    torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.02 * expected.abs().max().item())
    for t in (0, 4, 8):
        assert torch.equal(
            kernels.quant_moe(x[t : t + 1], gate_up, down, ids[t : t + 1], weights[t : t + 1]), y[t : t + 1]
        )
    with pytest.raises(RuntimeError, match="expert id out of range"):
        kernels.quant_moe(x[:1], gate_up, down, torch.tensor([[0, 1, e]]), weights[:1])


def _logit_agreement(path) -> tuple[float, float, torch.nn.Module]:
    fast, exact = load_model(path, progress=False), load_model(path, dtype="float32", progress=False)
    fast.use_cpu_kernels()
    ids = torch.randint(0, exact.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        p, q = exact(ids).log_softmax(-1), fast(ids).float().log_softmax(-1)
        assert torch.equal(fast(ids[1:2]), fast(ids)[1:2])  # batch-invariant end to end
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return kl, (p.argmax(-1) == q.argmax(-1)).float().mean().item(), fast


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_the_shipped_model_stays_quantized_and_agrees(tmp_path, quant):
    source = load_model(default_model_dir(), dtype="float32", progress=False)
    path = save_gguf(
        source,
        Tokenizer.from_pretrained(default_model_dir()),
        tmp_path / f"{quant}.gguf",
        quant,
        progress=False,
    )
    kl, top1, model = _logit_agreement(path)
    assert kl < 0.01 and top1 > 0.9, (kl, top1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj.packed, kernels.QuantWeight) and attn.qkv_proj.weight.stride() == (0, 0)
    assert isinstance(mlp.packed_gate_up, kernels.QuantWeight) and mlp.packed_gate_up.gate_up
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    held = sum(
        m.packed.nbytes
        for m in model.modules()
        if isinstance(getattr(m, "packed", None), kernels.QuantWeight)
    )
    held += sum(layer.mlp.packed_gate_up.nbytes for layer in model.model.layers)
    tensors = {t.name: t for t in GGUFCheckpoint(path).tensors}
    matrices = sum(
        t.data.nbytes for t in tensors.values() if len(t.shape) == 2 and t.name != "token_embd.weight"
    )
    tied = tensors["token_embd.weight"].data.nbytes if model.config.tie_word_embeddings else 0
    growth = 1.0 if quant == "q8_0" else BITS_HELD["Q4_0"] / 4.5  # Q4_0 keeps -8 d as an fp16 min per block
    assert held <= growth * (matrices + tied) * 1.001
    with pytest.raises(RuntimeError, match="for inference"):
        model.model.layers[0].mlp.down_proj(
            torch.zeros(1, model.config.intermediate_size, requires_grad=True)
        )
    with pytest.raises(RuntimeError, match="for inference"):  # never the zero stand-ins
        model.model.layers[0].mlp(torch.zeros(1, model.config.hidden_size, requires_grad=True))


def test_a_k_quant_mix_dense_and_moe(tmp_path):
    """Random Q4_K_M files (Q4_K with Q6_K for attn_v / ffn_down in some layers): quantized load agrees with
    float32 on the same weights, experts included."""
    tokenizer = Tokenizer.from_pretrained(default_model_dir())
    dense = Qwen3Config.from_dict(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
    ))  # fmt: skip
    path = write_random_gguf(dense, tokenizer, tmp_path / "dense.gguf", "Q4_K_M", progress=False)
    types = {t.name: t.type.name for t in GGUFCheckpoint(path).tensors}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.2.attn_v.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    # random codes and mins make outlier-heavy activations, harder on int8 activations than trained weights
    kl, top1, model = _logit_agreement(path)
    assert kl < 0.1 and top1 > 0.85, (kl, top1)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.packed, tuple)  # q, k Q4_K beside v Q6_K
    moe = Qwen3Config.from_dict(dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, norm_topk_prob=True,
    ))  # fmt: skip
    path = write_random_gguf(moe, tokenizer, tmp_path / "moe.gguf", "Q4_K_M", progress=False)
    kl, top1, model = _logit_agreement(path)
    assert kl < 0.1 and top1 > 0.85, (kl, top1)
    assert model.model.layers[0].mlp.experts.quant is not None


def test_a_quantized_model_refuses_to_be_saved_as_zeros(tmp_path):
    from qwen3.checkpoint import save_model

    source = load_model(default_model_dir(), dtype="float32", progress=False)
    path = save_gguf(
        source, Tokenizer.from_pretrained(default_model_dir()), tmp_path / "q8.gguf", "q8_0", progress=False
    )
    with pytest.raises(ValueError, match="held quantized"):
        save_model(load_model(path, progress=False), tmp_path / "out")
    save_model(load_model(path, dtype="bfloat16", progress=False), tmp_path / "out")  # dequantized: fine
