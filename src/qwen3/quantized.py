"""GGUF's quantized blocks repacked, losslessly, into the layout of qwen3's quantized kernels.

A GGUF tensor of type Q8_0 ... Q6_K stores each row as blocks of codes with fp16 scales (and mins); in
every type a weight is ``scale * code + min`` within a block of 16 or 32 values, with the scale and min
built from fp16 super-block factors and small integer sub-block factors (``csrc/quant.cpp`` has the
table). :func:`repack` decodes a tensor's blocks into those codes and factors, nothing rounded, and
lays them out per group of 8 output rows as the kernel reads them; :func:`reconstruct` inverts that
(tests compare it with ``gguf.quants.dequantize``). :class:`QuantizedEmbedding` looks rows up in the
file's own blocks (dequantized by the ``gguf`` package, as the bf16 loader does), so an embedding
costs memory only for the rows read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qwen3.kernels import QuantWeight, huge_page_empty

ROWS = 8  # output rows per kernel group
QK_K = 256

# GGUF type -> (code bits, block, super-block) in the kernel's terms
FORMATS: dict[str, tuple[int, int, int]] = {
    "Q8_0": (8, 32, 32),
    "Q5_0": (8, 32, 32),
    "Q5_1": (8, 32, 32),
    "Q4_0": (4, 32, 32),
    "Q4_1": (4, 32, 32),
    "Q4_K": (4, 32, QK_K),
    "Q5_K": (8, 32, QK_K),
    "Q6_K": (8, 16, QK_K),
    "Q3_K": (4, 16, QK_K),
    "Q2_K": (4, 16, QK_K),
}
"""The GGUF types the quantized kernels run; F32/F16/BF16 matrices go to the bf16 kernels instead."""


@dataclass
class _Decoded:
    """One chunk of rows decoded: codes [R, K] and per-row factors (fp16 bits / int8), None if absent."""

    codes: np.ndarray
    d: np.ndarray
    sc: np.ndarray | None = None
    m: np.ndarray | None = None
    mc: np.ndarray | None = None


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per block (the last axis) as fp16 bit patterns, int16."""
    return np.ascontiguousarray(b).view(np.int16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the 16 low nibbles, then the 16 high ones (legacy types)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _low_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """4 bytes of high bits per block -> [..., 32] bits, little-endian bit order."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :n]


def _decode(kind: str, blocks: np.ndarray) -> _Decoded:
    """blocks [R, nb, block_bytes] uint8 of one type -> codes [R, K] and factors (see csrc/quant.cpp)."""
    r, nb = blocks.shape[:2]
    if kind == "Q8_0":
        return _Decoded(blocks[..., 2:].view(np.int8).reshape(r, -1), _f16(blocks[..., :2]))
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks[..., :2])
        qs = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
        codes = _nibbles(qs).reshape(r, -1)
        if kind == "Q4_1":
            return _Decoded(codes, d, m=_f16(blocks[..., 2:4]))
        m = (d.view(np.float16).astype(np.float32) * -8).astype(np.float16)  # exact: a power of two
        if not np.isfinite(m).all():
            raise ValueError("Q4_0 block scale too large for the kernel's fp16 min (-8 d)")
        return _Decoded(codes, d, m=m.view(np.int16))
    if kind in ("Q5_0", "Q5_1"):
        off = 4 if kind == "Q5_1" else 2
        q = _nibbles(blocks[..., off + 4 :]) | (_low_bits(blocks[..., off : off + 4], 32) << 4)
        d = _f16(blocks[..., :2])
        if kind == "Q5_1":
            return _Decoded(q.reshape(r, -1).astype(np.int8), d, m=_f16(blocks[..., 2:4]))
        return _Decoded((q.astype(np.int16) - 16).astype(np.int8).reshape(r, -1), d)
    if kind in ("Q4_K", "Q5_K"):
        import gguf

        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(r * nb, 12))
        qs = blocks[..., -128:].reshape(r, nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(
            1, 1, 1, 2, 1
        )
        q = (qs & 0x0F).reshape(r, nb, 8, 32)
        if kind == "Q5_K":
            qh = blocks[..., 16:48].reshape(r, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
            q = q | ((qh & 1) << 4)
        return _Decoded(
            q.reshape(r, -1).astype(np.int8 if kind == "Q5_K" else np.uint8),
            d,
            sc.reshape(r, -1).astype(np.int8),
            dmin,
            (-mn.astype(np.int16)).reshape(r, -1).astype(np.int8),
        )
    if kind == "Q6_K":
        ql = blocks[..., :128].reshape(r, nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(
            1, 1, 1, 2, 1
        )
        ql = (ql & 0x0F).reshape(r, nb, 8, 32)
        qh = blocks[..., 128:192].reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(
            1, 1, 1, 4, 1
        )
        qh = (qh & 3).reshape(r, nb, 8, 32)
        q = (ql | (qh << 4)).astype(np.int16) - 32
        return _Decoded(
            q.reshape(r, -1).astype(np.int8),
            _f16(blocks[..., 208:210]),
            blocks[..., 192:208].view(np.int8).reshape(r, -1),
        )
    if kind == "Q3_K":
        hmask, qs = blocks[..., :32], blocks[..., 32:96]
        scales, d = blocks[..., 96:108], _f16(blocks[..., 108:110])
        lo = (
            scales[..., :8].reshape(r, nb, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        ).reshape(r, nb, 16)
        hi = (
            scales[..., 8:].reshape(r, nb, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        ).reshape(r, nb, 16)
        sc = ((lo & 0x0F) | ((hi & 3) << 4)).astype(np.int16) - 32
        ql = (
            qs.reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
        ) & 3
        qh = (hmask.reshape(r, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
        code = ql.reshape(r, nb, 8, 32) + (qh << 2)  # q + 4, q = ql - 4 (1 - h): 0..7
        m = (d.view(np.float16).astype(np.float32) * -4).astype(np.float16)
        if not np.isfinite(m).all():
            raise ValueError("Q3_K super-block scale too large for the kernel's fp16 min")
        return _Decoded(code.reshape(r, -1).astype(np.uint8), d, sc.reshape(r, -1).astype(np.int8), m.view(np.int16),
                        sc.reshape(r, -1).astype(np.int8))  # fmt: skip
    if kind == "Q2_K":
        scales, qs = blocks[..., :16], blocks[..., 16:80]
        d, dmin = _f16(blocks[..., 80:82]), _f16(blocks[..., 82:84])
        q = (qs.reshape(r, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
        return _Decoded(
            q.reshape(r, -1).astype(np.uint8),
            d,
            (scales & 0x0F).astype(np.int8).reshape(r, -1),
            dmin,
            (-(scales >> 4).astype(np.int16)).astype(np.int8).reshape(r, -1),
        )
    raise ValueError(f"no quantized kernel format for {kind}")


def _group_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [R, K] (R a multiple of 8) -> kernel layout [R/8, K * bits] uint8."""
    r, k = codes.shape
    c = codes.view(np.uint8).reshape(r // ROWS, ROWS, k // 4, 4) if bits == 8 else None
    if bits == 8:
        return np.ascontiguousarray(c.transpose(0, 2, 1, 3)).reshape(r // ROWS, -1)
    c = codes.reshape(r // ROWS, ROWS, k // 8, 8)
    packed = c[..., :4] | (c[..., 4:] << 4)
    return np.ascontiguousarray(packed.transpose(0, 2, 1, 3)).reshape(r // ROWS, -1)


def _group_factors(f: np.ndarray) -> np.ndarray:
    """per-row factors [R, n] -> [R/8, n, 8]."""
    r, n = f.shape
    return np.ascontiguousarray(f.reshape(r // ROWS, ROWS, n).transpose(0, 2, 1))


def _block_bytes(kind: str) -> tuple[int, int]:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return block, size


def repack(kind: str, data: np.ndarray, rows: int, k: int, chunk_rows: int = 4096) -> QuantWeight:
    """The raw blocks of a ``[rows, k]`` tensor (or ``[E, rows, k]``, data flat per expert) as a QuantWeight.

    ``data`` is the tensor's bytes, uint8 ``[E, rows * row_bytes]`` or ``[rows * row_bytes]``. Rows are
    decoded ``chunk_rows`` at a time, so the temporaries stay small for the largest expert stacks.
    """
    bits, block, sup = FORMATS[kind]
    elems, size = _block_bytes(kind)
    if k % elems or k % 32:
        raise ValueError(f"{kind} rows of {k} values are not whole blocks")
    stacked = data.reshape(-1, rows, k // elems, size)
    experts = stacked.shape[0]
    groups = -(-rows // ROWS)
    padded = groups * ROWS
    codes = huge_page_empty((experts, groups, k * bits), torch.uint8)
    arrays: dict[str, torch.Tensor] = {}
    for e in range(experts):
        for r0 in range(0, padded, chunk_rows):
            r1 = min(padded, r0 + chunk_rows)
            real = stacked[e, r0 : min(r1, rows)]
            dec = _decode(kind, np.ascontiguousarray(real))
            if real.shape[0] < r1 - r0:  # pad the last group with zero rows
                pad = r1 - r0 - real.shape[0]
                dec = _Decoded(
                    *(None if a is None else np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in (
                        dec.codes, dec.d, dec.sc, dec.m, dec.mc))
                )  # fmt: skip
            g0, g1 = r0 // ROWS, r1 // ROWS
            codes[e, g0:g1] = torch.from_numpy(_group_codes(dec.codes, bits))
            for name in ("d", "sc", "m", "mc"):
                value = getattr(dec, name)
                if value is None:
                    continue
                grouped = _group_factors(value)
                if name not in arrays:
                    dtype = torch.int16 if name in ("d", "m") else torch.int8
                    arrays[name] = torch.empty(experts, groups, grouped.shape[1], ROWS, dtype=dtype)
                arrays[name][e, g0:g1] = torch.from_numpy(grouped)
    parts = (codes, arrays["d"], arrays.get("sc"), arrays.get("m"), arrays.get("mc"))
    return QuantWeight(rows, k, (bits, block, sup), parts, False, kind)


def reconstruct(weight: QuantWeight) -> torch.Tensor:
    """The float32 weights ``[E, N, K]`` a QuantWeight holds (tests, and the reader's reference)."""
    codes, d, sc, m, mc = weight.parts
    bits, block, sup = weight.fmt
    e, g, _ = codes.shape
    k = weight.in_features
    if bits == 8:
        q = codes.view(torch.int8).view(e, g, k // 4, ROWS, 4).permute(0, 1, 3, 2, 4).reshape(e, g * ROWS, k)
    else:
        c = codes.view(e, g, k // 8, ROWS, 4).permute(0, 1, 3, 2, 4)
        q = torch.cat([c & 0x0F, c >> 4], dim=-1).reshape(e, g * ROWS, k)
    q = q.float()

    def rows(t: torch.Tensor) -> torch.Tensor:  # [E, G, n, 8] -> [E, G*8, n]
        return t.permute(0, 1, 3, 2).reshape(e, g * ROWS, -1)

    scale = rows(d.view(torch.float16)).float()
    if sc is not None:
        scale = scale.repeat_interleave(sup // block, dim=-1) * rows(sc).float()
    w = q.view(e, g * ROWS, k // block, block) * scale[..., None]
    if m is not None:
        mins = rows(m.view(torch.float16)).float()
        if mc is not None:
            mins = mins.repeat_interleave(sup // block, dim=-1) * rows(mc).float()
        w = w + mins[..., None]
    return w.reshape(e, g * ROWS, k)[:, : weight.out_features]


class QuantizedEmbedding(nn.Module):
    """A token embedding looked up in a GGUF file's quantized rows (dequantized by ``gguf`` per lookup)."""

    def __init__(self, data: np.ndarray, kind: Any, rows: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = data.reshape(rows, -1)  # one row's blocks per line; a view of the mapped file
        self.kind = kind
        self.num_embeddings, self.embedding_dim, self.dtype = rows, dim, dtype
        self.weight = nn.Parameter(
            torch.zeros((), dtype=dtype).expand(rows, dim), requires_grad=False
        )  # stand-in

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        import gguf

        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        values = gguf.quants.dequantize(self.blocks[flat], self.kind).reshape(len(flat), self.embedding_dim)
        return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(self.dtype).view(*ids.shape, -1)


# ------------------------------------------------------------------------------- into a model


def _placeholder(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    """Replace a (meta) parameter whose values live quantized elsewhere by a zero-strided stand-in.

    It keeps the shape and dtype that code inspecting the model expects, and costs one element.
    """
    shape = getattr(module, name).shape
    stand_in = torch.zeros((), dtype=dtype).expand(shape)
    module._parameters[name] = nn.Parameter(stand_in, requires_grad=False)


def install(
    model: nn.Module,
    tensors: dict[str, Any],
    dtype: torch.dtype,
    check: Callable[[Any], None],
    release: Callable[[Any], None] | None = None,
) -> set[str]:
    """Give the model's big matrices quantized weights from GGUF ``tensors`` (name -> GGUFTensor).

    ``model`` is still on the meta device; what gets quantized weights keeps a stand-in parameter (see
    :func:`_placeholder`), the rest is left for the caller to materialise and fill. A matrix whose type
    has no kernel format (F16, BF16, F32) or that cannot be repacked stays with the caller. Returns the
    GGUF tensor names used here. ``check(tensor)`` raises for a tensor that does not fit the model;
    ``release(tensor)`` is called once a tensor is repacked (its file pages are no longer needed).
    """
    from qwen3.kernels import concat_quant_rows, interleave_gate_up
    from qwen3.layers import Experts

    used: set[str] = set()

    def quant(*names: str) -> list[QuantWeight] | None:
        found = [tensors.get(n) for n in names]
        if any(t is None or t.type.name not in FORMATS for t in found):
            return None
        for t in found:
            check(t)
        try:
            out = []
            for t in found:
                rows, k = t.shape[-2], t.shape[-1]
                out.append(repack(t.type.name, t.data, rows, k))
                if release is not None:
                    release(t)
        except ValueError:
            return None
        used.update(names)
        return out

    for i, layer in enumerate(model.model.layers):
        p = f"blk.{i}."
        attn = layer.self_attn
        if (qkv := quant(p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight")) is not None:
            same = len({w.fmt for w in qkv}) == 1
            attn.qkv_proj.packed = concat_quant_rows(qkv) if same else tuple(qkv)
            _placeholder(attn.qkv_proj, "weight", dtype)
        if (o := quant(p + "attn_output.weight")) is not None:
            attn.o_proj.packed = o[0]
            _placeholder(attn.o_proj, "weight", dtype)
        mlp = layer.mlp
        experts = getattr(mlp, "experts", None)
        if isinstance(experts, Experts):
            gate, up = tensors.get(p + "ffn_gate_exps.weight"), tensors.get(p + "ffn_up_exps.weight")
            if gate is not None and up is not None and gate.type == up.type:
                weights = quant(
                    p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight", p + "ffn_down_exps.weight"
                )
                if weights is not None:
                    experts.quant = (interleave_gate_up(weights[0], weights[1]), weights[2])
                    _placeholder(experts, "gate_up_proj", dtype)
                    _placeholder(experts, "down_proj", dtype)
        else:
            if (gu := quant(p + "ffn_gate.weight", p + "ffn_up.weight")) is not None:
                mlp.packed_gate_up = interleave_gate_up(*gu) if gu[0].fmt == gu[1].fmt else tuple(gu)
                _placeholder(mlp.gate_up_proj, "weight", dtype)
            if (down := quant(p + "ffn_down.weight")) is not None:
                mlp.down_proj.packed = down[0]
                _placeholder(mlp.down_proj, "weight", dtype)
    embedding = tensors.get("token_embd.weight")
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    lm_head = model.lm_head
    if (out := quant(head)) is not None:
        lm_head.packed = out[0]
        _placeholder(lm_head, "weight", dtype)  # (unties it from the embedding, which follows)
    if embedding is not None and embedding.type.name in FORMATS:
        check(embedding)
        rows, dim = embedding.shape
        model.model.embed_tokens = QuantizedEmbedding(embedding.data, embedding.type, rows, dim, dtype)
        used.add("token_embd.weight")
    return used


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
    """Allocate every parameter still on the meta device (tied ones stay tied); stand-ins are kept."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                done[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device))
            module._parameters[name] = done[id(param)]
