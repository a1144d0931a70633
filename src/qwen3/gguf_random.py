"""Random-weight GGUF files with a real Qwen3 config, written block by block with the ``gguf`` package.

Speed does not depend on the weights' values, but a benchmark of Qwen3-30B-A3B in Q4_K_M cannot go through
a bf16 checkpoint first (61 GB on a 24 GB machine): the random blocks are written straight into the file
(each block's codes random, its fp16 scales small and finite), one tensor at a time, so memory stays at
one tensor. Each tensor gets the type llama-quantize gives it in the chosen mix (``Q4_K_M``: Q6_K for the
output and for attn_v / ffn_down in the layers llama.cpp's ``use_more_bits`` picks, Q4_K elsewhere; norms
and the MoE router F32), so the file reads like one a user downloads. Tests use it for every type too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qwen3.config import Qwen3Config

# Byte range of each block's fp16 scale(s) (d, and dmin where the type has one).
SCALE_BYTES = {
    "Q8_0": (0, 2), "Q4_0": (0, 2), "Q5_0": (0, 2), "Q4_1": (0, 4), "Q5_1": (0, 4), "Q2_K": (80, 84),
    "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210),
}  # fmt: skip

# mix -> (general.file_type, the type of most matrices, of the "more bits" ones, of output.weight)
MIXES = {
    "Q8_0": (7, "Q8_0", "Q8_0", "Q8_0"),
    "Q4_0": (2, "Q4_0", "Q4_0", "Q6_K"),
    "Q4_K_S": (14, "Q4_K", "Q4_K", "Q6_K"),
    "Q4_K_M": (15, "Q4_K", "Q6_K", "Q6_K"),
    "Q5_K_M": (17, "Q5_K", "Q6_K", "Q6_K"),
    "Q6_K": (18, "Q6_K", "Q6_K", "Q6_K"),
}


def random_blocks(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random blocks of GGUF type ``kind`` for a tensor of logical ``shape``: uint8 ``[..., row_bytes]``."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    *lead, k = shape
    data = rng.integers(0, 256, (*lead, k // block, size), dtype=np.uint8)
    start, end = SCALE_BYTES[kind]
    scales = rng.uniform(1e-4, 2e-3, (*lead, k // block, (end - start) // 2)).astype(np.float16)
    data[..., start:end] = scales.view(np.uint8)
    return data.reshape(*lead, -1)


def _more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _tensors(config: Qwen3Config, mix: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, logical shape, type) of every tensor of a model with ``config`` in ``mix``."""
    _, base, more, output = MIXES[mix]
    h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    out = [("token_embd.weight", (config.vocab_size, h), output if config.tie_word_embeddings else base)]
    for i in range(layers):
        p, bits = f"blk.{i}.", more if _more_bits(i, layers) else base
        out += [
            (p + "attn_norm.weight", (h,), "F32"), (p + "attn_q.weight", (q, h), base),
            (p + "attn_k.weight", (kv, h), base), (p + "attn_v.weight", (kv, h), bits),
            (p + "attn_output.weight", (h, q), base), (p + "attn_q_norm.weight", (d,), "F32"),
            (p + "attn_k_norm.weight", (d,), "F32"), (p + "ffn_norm.weight", (h,), "F32"),
        ]  # fmt: skip
        if config.is_sparse_layer(i):
            e, ff = config.num_experts, config.moe_intermediate_size
            out += [
                (p + "ffn_gate_inp.weight", (e, h), "F32"), (p + "ffn_gate_exps.weight", (e, ff, h), base),
                (p + "ffn_up_exps.weight", (e, ff, h), base), (p + "ffn_down_exps.weight", (e, h, ff), bits),
            ]  # fmt: skip
        else:
            ff = config.intermediate_size
            out += [
                (p + "ffn_gate.weight", (ff, h), base), (p + "ffn_up.weight", (ff, h), base),
                (p + "ffn_down.weight", (h, ff), bits),
            ]  # fmt: skip
    out.append(("output_norm.weight", (h,), "F32"))
    if not config.tie_word_embeddings:
        out.append(("output.weight", (config.vocab_size, h), output))
    return out


def write_random_gguf(
    config: Qwen3Config,
    tokenizer: Any,
    path: str | os.PathLike,
    mix: str = "Q4_K_M",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a random-weight GGUF of ``config`` in llama-quantize's ``mix`` (see :data:`MIXES`), streaming."""
    import gguf

    from qwen3.gguf_checkpoint import gguf_writer

    if mix not in MIXES:
        raise ValueError(f"mix {mix!r} is not one of {', '.join(MIXES)}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = gguf_writer(config, tokenizer, partial, MIXES[mix][0])
    plan = _tensors(config, mix)
    for name, shape, kind in plan:
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            continue
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        writer.add_tensor_info(
            name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype
        )
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, kind in tqdm(plan, desc=f"Writing random {mix}", unit="tensor", disable=not progress):
        if kind == "F32":  # norms 1, the router random
            data = (
                rng.normal(0, 0.02, shape).astype(np.float32)
                if "gate_inp" in name
                else np.ones(shape, np.float32)
            )
        else:
            data = random_blocks(kind, shape, rng)
        writer.write_tensor_data(data)
    writer.close()
    partial.replace(path)
    return path
