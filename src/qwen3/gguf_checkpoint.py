"""Load Qwen3 GGUF files (llama.cpp's format; Qwen's official GGUFs, Ollama's library) as qwen3 models.

A GGUF file holds everything a checkpoint folder does: the config (``{arch}.*`` metadata, arch ``qwen3`` or
``qwen3moe``), the tokenizer (``tokenizer.ggml.*``: byte-level BPE tokens, merges and token types), the chat
template (``tokenizer.chat_template``) and the weights, float or block-quantized. The header is parsed here
and the file memory-mapped; tensor types, block sizes and dequantization are llama.cpp's own ``gguf``
package's. The config goes through :meth:`Qwen3Config.from_dict`, so it is validated like any config.json;
the tokenizer is rebuilt with the same pipeline as the Hugging Face one, so it encodes identically.

Weights are dequantized at load, tensor by tensor, with ``gguf.quants.dequantize`` (bit-exact to
llama.cpp's dequantization, every type it knows) into the model's dtype: float32 keeps every value a
quantized file describes; the default, bfloat16, is what the CPU kernels run fastest. A file whose tensors,
shapes or types do not fit the config, or that is truncated or corrupt, raises :class:`CheckpointError`
naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qwen3.config import ConfigError, Qwen3Config, parse_dtype
from qwen3.device import check_weights_fit
from qwen3.hub import CheckpointError, ModelNotFoundError
from qwen3.model import Qwen3ForCausalLM, checkpoint_layout, model_class

if TYPE_CHECKING:
    from qwen3.distributed import TensorParallel

logger = logging.getLogger(__name__)

ARCHITECTURES = {"qwen3": "qwen3", "qwen3moe": "qwen3_moe"}  # GGUF architecture -> config model_type
# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EXPERT_PROJECTIONS = {  # a stack of every expert's matrix -> the Hugging Face projection
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_EXPERTS = tuple(_EXPERT_PROJECTIONS)
# The tensor types qwen3 reads (llama-quantize's _S/_M mixes combine several of them in one file).
SUPPORTED_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)
# llama.cpp's converter marks every <|...|> added token CONTROL; in Qwen's own tokenizer these are added
# tokens that are not special (kept by skip_special_tokens), so they stay that way here.
QWEN_ADDED_NOT_SPECIAL = frozenset(
    {"<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
)
_MAX_DIMS = 4  # GGML_MAX_DIMS
QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}  # generation_config.json
# token_type values of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def is_gguf(source: str | os.PathLike) -> bool:
    """A ``.gguf`` file, or a Hub reference to one: ``owner/repo:FILE.gguf`` or ``owner/repo:QUANT``."""
    text = str(source)
    if Path(text).expanduser().is_dir():
        return False
    if text.lower().endswith(".gguf"):
        return True
    repo, sep, choice = text.partition(":")
    return bool(sep) and repo.count("/") == 1 and bool(re.fullmatch(r"[A-Za-z0-9_]+", choice))


def resolve_gguf(source: str | os.PathLike) -> Path:
    """A local path for ``source``: the file itself, or from the Hugging Face Hub (or its cache, offline)
    ``owner/repo:FILE.gguf`` or ``owner/repo:QUANT`` (``Qwen/Qwen3-8B-GGUF:Q4_K_M``: the one file of
    that quant type, split files not included)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    text = str(source)
    repo, sep, choice = text.partition(":")
    if not sep or repo.count("/") != 1 or path.exists():
        raise ModelNotFoundError(f"{text!r} is not a GGUF file, nor a Hub reference owner/repo:FILE.gguf")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if choice.lower().endswith(".gguf"):
            return Path(hf_hub_download(repo_id=repo, filename=choice))
        variants = sorted({choice, choice.upper(), choice.lower()})
        folder = Path(snapshot_download(repo_id=repo, allow_patterns=[f"*{v}.gguf" for v in variants]))
    except Exception as exc:  # offline and not cached, no such repo or file: say which
        raise ModelNotFoundError(f"{text!r} could not be fetched from the Hugging Face Hub: {exc}") from exc
    wanted = re.compile(rf".*[-._]{re.escape(choice)}\.gguf", re.IGNORECASE)
    found = sorted(p for p in folder.rglob("*.gguf") if wanted.fullmatch(p.name))
    if len(found) != 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found) or "none"
        raise ModelNotFoundError(
            f"{text!r}: {len(found)} GGUF files of that type in {repo} ({names}); name the file"
        )
    return found[0]


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its type, logical shape (row-major, ``[..., out, in]``; GGUF stores the
    reverse) and its bytes, a view of the memory-mapped file shaped ``[..., row_bytes]``."""

    name: str
    type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from the mapped file; running past its end raises ValueError."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.offset = buffer, 0

    def read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.buffer):
            raise ValueError(f"the file ends inside its header (offset {self.offset})")
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        length = self.read("<Q")
        if self.offset + length > len(self.buffer):
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = bytes(self.buffer[self.offset : self.offset + length]).decode("utf-8")
        self.offset += length
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.read(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.read("<I"), self.read("<Q")
        if item == _STRING:
            return [self.string() for _ in range(count)]
        if item not in _SCALARS:
            raise ValueError(f"unsupported array item type {item}")
        dtype = np.dtype(_SCALARS[item])
        if self.offset + count * dtype.itemsize > len(self.buffer):
            raise ValueError(f"an array of {count} items runs past the end of the file")
        values = np.frombuffer(self.buffer, dtype, count, self.offset)  # a view: no per-item objects
        self.offset += count * dtype.itemsize
        return values


class GGUFCheckpoint:
    """One GGUF file, memory-mapped: its metadata, config, tokenizer and tensors.

    The header is parsed here rather than with ``gguf.GGUFReader``, which builds a numpy view per item of
    every metadata array and takes about 7 s to open a file with Qwen3's 151,936 tokens; this takes well
    under one. The tensor types, block sizes and dequantization are the ``gguf`` package's.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import gguf

        self.path = Path(path)
        self._map: mmap.mmap | None = None
        problem = None
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.fields, self.tensors = self._parse(memoryview(self._map), gguf)
        except (OSError, ValueError, UnicodeDecodeError, struct.error, OverflowError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:  # raised out here, so no traceback keeps the views and the map alive
            if self._map is not None:
                with contextlib.suppress(BufferError):
                    self._map.close()
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({problem})")
        self.arch = self.field("general.architecture", kind=str)
        if self.arch not in ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: general.architecture {self.arch!r} is not Qwen3 (qwen3 loads {sorted(ARCHITECTURES)})"
            )

    def _parse(self, buffer: memoryview, gguf: Any) -> tuple[dict[str, Any], list[GGUFTensor]]:
        cursor = _Cursor(buffer)
        if cursor.read("<I") != gguf.GGUF_MAGIC:
            raise ValueError("no GGUF magic at the start")
        version = cursor.read("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (qwen3 reads 2 and 3)")
        tensor_count, kv_count = cursor.read("<Q"), cursor.read("<Q")
        if tensor_count > len(buffer) // 24 or kv_count > len(buffer) // 12:
            raise ValueError(
                f"{tensor_count} tensors and {kv_count} entries cannot fit in {len(buffer)} bytes"
            )
        fields: dict[str, Any] = {}
        self.field_types: dict[str, Any] = {}  # key -> gguf.GGUFValueType (an array's: its items')
        for _ in range(kv_count):
            key = cursor.string()
            kind = cursor.read("<I")
            item = struct.unpack_from("<I", buffer, cursor.offset)[0] if kind == _ARRAY else kind
            fields[key] = cursor.value(kind)
            self.field_types[key] = gguf.GGUFValueType(item)
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.read("<I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows {_MAX_DIMS})")
            dims = [cursor.read("<Q") for _ in range(n_dims)]
            kind, offset = cursor.read("<I"), cursor.read("<Q")
            infos.append((name, dims, kind, offset))
        if len({info[0] for info in infos}) != len(infos):
            raise ValueError("two tensors have the same name")
        alignment = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if (
            isinstance(alignment, bool)
            or not isinstance(alignment, int)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        start = -(-cursor.offset // alignment) * alignment
        tensors, spans = [], []
        for name, dims, kind, offset in infos:
            if offset % alignment:
                raise ValueError(f"tensor {name!r}: its data offset {offset} is not aligned to {alignment}")
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown type {kind}") from None
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            shape = tuple(int(d) for d in reversed(dims)) or (1,)
            if shape[-1] % block:
                raise ValueError(
                    f"tensor {name!r}: rows of {shape[-1]} do not divide into {qtype.name} blocks"
                )
            row_bytes = shape[-1] // block * block_bytes
            rows = math.prod(shape[:-1])
            begin, size = start + offset, rows * row_bytes
            if begin + size > len(buffer):
                raise ValueError(f"tensor {name!r}: its data runs past the end of the file (truncated?)")
            spans.append((begin, begin + size, name))
            data = np.frombuffer(buffer, np.uint8, size, begin).reshape(*shape[:-1], row_bytes)
            tensors.append(GGUFTensor(name, qtype, shape, data))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise ValueError(f"tensors {first!r} and {second!r} overlap in the file")
        return fields, tensors

    def field(self, key: str, default: Any = None, kind: type | None = None) -> Any:
        """A metadata value, checked to be of ``kind`` (int, float, str, list: a list of strings,
        np.ndarray: a numeric array) when given and present; a wrong type names the key. float32 values
        read as the shortest decimal that round-trips (1e-06, not 9.999999974752427e-07), so configs read
        from GGUF equal those read from config.json."""
        value = self.fields.get(key, default)
        if value is not None and kind is not None:
            if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)
            elif isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                raise CheckpointError(
                    f"{self.path}: metadata {key!r} is not a {kind.__name__}: {str(value)[:80]}"
                )
            if kind is list and not all(isinstance(item, str) for item in value):
                raise CheckpointError(f"{self.path}: metadata {key!r} is not a list of strings")
        if isinstance(value, float):
            value = float(str(np.float32(value)))
        return value

    # --- config -----------------------------------------------------------------------------------

    def config(self) -> Qwen3Config:
        """The config the metadata describes, validated as config.json would be."""
        a = self.arch
        tensors = {t.name for t in self.tensors}
        raw: dict[str, Any] = {
            "model_type": ARCHITECTURES[a],
            "vocab_size": len(self.field("tokenizer.ggml.tokens", [], list)) or self._embedding_rows(),
            "hidden_size": self.field(f"{a}.embedding_length", kind=int),
            "num_hidden_layers": self.field(f"{a}.block_count", kind=int),
            "num_attention_heads": self.field(f"{a}.attention.head_count", kind=int),
            "num_key_value_heads": self.field(f"{a}.attention.head_count_kv", kind=int),
            "head_dim": self.field(f"{a}.attention.key_length", kind=int),
            "max_position_embeddings": self.field(f"{a}.context_length", kind=int),
            "rms_norm_eps": self.field(f"{a}.attention.layer_norm_rms_epsilon", kind=float),
            "rope_theta": self.field(f"{a}.rope.freq_base", 10000.0, float),  # llama.cpp's default too
            "tie_word_embeddings": "output.weight" not in tensors,
            "attention_bias": "blk.0.attn_q.bias" in tensors,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id", kind=int),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id", kind=int),
        }
        if a == "qwen3":
            raw["intermediate_size"] = self.field(f"{a}.feed_forward_length", kind=int)
        else:
            raw.update(
                num_experts=self.field(f"{a}.expert_count", kind=int),
                num_experts_per_tok=self.field(f"{a}.expert_used_count", kind=int),
                moe_intermediate_size=self.field(f"{a}.expert_feed_forward_length", kind=int),
                norm_topk_prob=True,  # llama.cpp assumes it for qwen3moe; true for every released Qwen3 MoE
                intermediate_size=self.field(f"{a}.feed_forward_length", 0, int) or 1,
            )
        scaling = self.field(f"{a}.rope.scaling.type", kind=str)
        if scaling and scaling != "none":
            factor = self.field(f"{a}.rope.scaling.factor", kind=float)
            if factor is None:
                raise CheckpointError(f"{self.path}: {a}.rope.scaling.type {scaling!r} without a factor")
            original = self.field(f"{a}.rope.scaling.original_context_length", kind=int)
            raw["rope_scaling"] = {
                "rope_type": scaling,
                "factor": factor,
                "original_max_position_embeddings": original or raw["max_position_embeddings"],
            }
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            if raw[key] is None:
                raise CheckpointError(f"{self.path}: metadata lacks the {key} entry ({a}.*)")
        raw = {k: v for k, v in raw.items() if v is not None}
        try:
            return Qwen3Config.from_dict(raw)
        except ConfigError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's pages from this process's mapping once its values live elsewhere (repacked): they
        leave the RSS (the page cache keeps them), so a model loads in about its file's size, not twice it."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED") or tensor.data.size == 0:
            return
        base = np.frombuffer(self._map, np.uint8, 1, 0).ctypes.data
        start = tensor.data.ctypes.data - base
        if not 0 <= start <= start + tensor.data.nbytes <= len(self._map):
            return  # a copy (a tensor-parallel column cut), not the file's pages
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, (start + tensor.data.nbytes) // page * page
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def decode_bytes(self) -> int:
        """Bytes of weights one batch-1 decode step reads from this file as stored: every matrix, the routed
        share of each MoE expert stack, the embedding only where it doubles as the output (the roofline's
        numerator for a quantized file)."""
        config = self.config()
        total = 0.0
        for t in self.tensors:
            size = t.data.nbytes
            if t.name == "token_embd.weight" and not config.tie_word_embeddings:
                size = 0  # one row per token
            elif t.name.endswith("_exps.weight"):
                size = size * config.num_experts_per_tok / config.num_experts
            total += size
        return int(total)

    def generation_config(self) -> dict[str, Any]:
        """What a checkpoint folder's generation_config.json would say: the end-of-generation ids (the eos
        token and ``<|endoftext|>``, on which llama.cpp also stops) and the sampling defaults every official
        Qwen3 checkpoint publishes (GGUF has no place for them)."""
        tokens = self.field("tokenizer.ggml.tokens", [], list)
        eos = [i for i in (self.field("tokenizer.ggml.eos_token_id", kind=int),) if i is not None]
        if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") not in eos:
            eos.append(tokens.index("<|endoftext|>"))
        return {"eos_token_id": eos, **QWEN3_SAMPLING}

    def _embedding_rows(self) -> int | None:
        embedding = next((t for t in self.tensors if t.name == "token_embd.weight"), None)
        return embedding.shape[0] if embedding is not None else None

    # --- tokenizer --------------------------------------------------------------------------------

    def tokenizer(self):  # -> qwen3.tokenizer.Tokenizer (imported late: tokenizer imports jinja machinery)
        """The byte-level BPE the metadata holds, as a :class:`qwen3.tokenizer.Tokenizer`: normal tokens
        and merges make the BPE, control tokens are special added tokens, user-defined ones (``<think>``,
        ``<tool_call>``, ...) added tokens that are not special; padding entries are left out."""
        from qwen3.tokenizer import Tokenizer, build_backend_from_vocab, check_template

        model = self.field("tokenizer.ggml.model", kind=str)
        tokens = self.field("tokenizer.ggml.tokens", kind=list)
        types = self.field("tokenizer.ggml.token_type", kind=np.ndarray)
        merges = self.field("tokenizer.ggml.merges", kind=list)
        if model != "gpt2" or not tokens or not merges or types is None or len(types) != len(tokens):
            raise CheckpointError(
                f"{self.path}: tokenizer.ggml.* does not describe a byte-level BPE (model {model!r}, "
                f"{len(tokens or [])} tokens, {len(merges or [])} merges, {0 if types is None else len(types)} token types)"
            )
        vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind == _NORMAL}
        added = {
            str(i): {"content": t, "special": kind == _CONTROL and t not in QWEN_ADDED_NOT_SPECIAL}
            for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind in (_CONTROL, _USER_DEFINED)
        }
        try:
            backend = build_backend_from_vocab(vocab, [tuple(m.split(" ", 1)) for m in merges], added)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: tokenizer.ggml.* cannot be built ({exc})") from None
        config: dict[str, Any] = {}
        # Qwen's pad token is <|endoftext|>, which its files also give as bos
        for key, names in (
            ("eos_token", ("eos_token_id",)),
            ("pad_token", ("padding_token_id", "bos_token_id")),
        ):
            index = next(
                (i for n in names if (i := self.field(f"tokenizer.ggml.{n}", kind=int)) is not None), None
            )
            if index is not None and 0 <= index < len(tokens):
                config[key] = tokens[index]
        template = self.field("tokenizer.chat_template", kind=str)
        if template is not None:
            check_template(template, self.path)
        return Tokenizer(backend, config, template)


def _target(
    layout: dict[str, tuple[torch.nn.Parameter, Any]], model: Qwen3ForCausalLM, name: str
) -> tuple[Any, Any]:
    """Where a GGUF tensor goes in the model: (parameter, index), or None for a tensor we do not know."""
    if name in _GLOBAL_NAMES:
        return layout.get(_GLOBAL_NAMES[name])
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if rest in _LAYER_NAMES:
        return layout.get(f"model.layers.{layer}.{_LAYER_NAMES[rest]}")
    if rest in _EXPERTS and layer < len(model.model.layers):
        experts = getattr(model.model.layers[layer].mlp, "experts", None)
        if experts is None:
            return None
        size = experts.intermediate_size
        if rest == "ffn_gate_exps.weight":
            return experts.gate_up_proj, (slice(None), slice(0, size))
        if rest == "ffn_up_exps.weight":
            return experts.gate_up_proj, (slice(None), slice(size, 2 * size))
        return experts.down_proj, (slice(None),)
    return None


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """A GGUF tensor as float32 in its logical shape."""
    import gguf

    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.type), dtype=np.float32).reshape(
        tensor.shape
    )


def load_gguf_model(
    source: str | os.PathLike | GGUFCheckpoint,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tp: TensorParallel | None = None,
) -> Qwen3ForCausalLM:
    """A Qwen3 or Qwen3-MoE model from a GGUF file (or one already opened), every tensor checked against
    the config.

    ``dtype`` None on a CPU with qwen3's kernels: quantized matrices stay quantized (repacked for
    ``csrc/quant.cpp``, see :mod:`qwen3.quantized`) and everything else is bfloat16 (float32 for an
    all-float32 file). An explicit ``dtype`` (or no kernels, or another device) dequantizes every tensor
    into it, as ``gguf.quants.dequantize`` does. ``tp``: this rank's shard only, every tensor cut with
    :func:`shard` before it is repacked or dequantized.
    """
    from qwen3 import kernels, quantized

    checkpoint = source if isinstance(source, GGUFCheckpoint) else GGUFCheckpoint(resolve_gguf(source))
    config = checkpoint.config()
    tensors = (
        checkpoint.tensors
        if tp is None
        else [_rank_shard(tp, t, checkpoint.path) for t in checkpoint.tensors]
    )
    kinds = {t.type.name for t in tensors if len(t.shape) > 1}
    target_dtype = parse_dtype(dtype) or (torch.float32 if kinds <= {"F32"} else torch.bfloat16)
    keep_quantized = (
        dtype is None
        and torch.device(device).type == "cpu"
        and bool(kinds & set(quantized.FORMATS))
        and kernels.kernels_available()
    )
    if keep_quantized:  # about the file's size: what stays quantized, and the rest in bf16
        check_weights_fit(sum(t.data.nbytes for t in tensors) // 2, torch.bfloat16, device, checkpoint.path)
    else:
        shards = tp.size if tp else 1
        check_weights_fit(config.num_parameters() // shards, target_dtype, device, checkpoint.path)
    with torch.device("meta"):
        model = model_class(config)(config, tp)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    done: set[str] = set()
    if keep_quantized:
        by_name = {t.name: t for t in tensors}
        meta_layout = checkpoint_layout(model)

        def check(tensor: GGUFTensor) -> None:
            target = _target(meta_layout, model, tensor.name)
            if target is not None:
                _check_shape(checkpoint.path, tensor.name, tensor.shape, tuple(target[0][target[1]].shape))

        done = quantized.install(model, by_name, target_dtype, check, checkpoint.release)
        logger.info("%d of %d GGUF tensors kept quantized", len(done), len(by_name))
    quantized.materialize(model, target_dtype, device)
    layout = checkpoint_layout(model)  # (stand-ins where the weights are quantized)
    expected = {name for name in layout}
    seen: set[str] = set()
    for tensor in tqdm(tensors, desc="Loading GGUF", unit="tensor", disable=not progress, leave=False):
        name = tensor.name
        if name in done:
            seen.update(_covered(name, config))
            continue
        target = _target(layout, model, name)
        if target is None:
            raise CheckpointError(f"{checkpoint.path}: unexpected tensor {name!r} (not part of this model)")
        param, index = target
        where = param.data[index]
        if tensor.type.name not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name!r} has type {tensor.type.name}; qwen3 reads "
                f"{', '.join(sorted(SUPPORTED_TYPES))}"
            )
        try:
            values = dequantize(tensor)
        except Exception as exc:  # a truncated data section reads short
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name!r} is unreadable ({type(exc).__name__}: {exc})"
            ) from None
        _check_shape(checkpoint.path, name, tuple(values.shape), tuple(where.shape))
        where.copy_(torch.from_numpy(np.require(values, requirements="W")))  # float32 data is a read-only map
        seen.update(_covered(name, config))
    missing = sorted(n for n in expected if n not in seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{checkpoint.path}: missing tensor(s) {missing[:5]}{more} (Hugging Face names)"
        )
    return model.eval()


def shard(tensor: GGUFTensor, index: tuple[slice, ...], path: Path) -> GGUFTensor:
    """The part ``index`` (slices of the logical shape's leading dimensions) of a GGUF tensor, still in its
    type: rows are cut as they are, a row's elements only at the type's block boundaries (a row of Q4_K
    splits between blocks of 256). Leading-dimension cuts stay views of the mapped file."""
    import gguf

    block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.type]
    index = tuple(index) + (slice(None),) * (len(tensor.shape) - len(index))
    bounds = [part.indices(n)[:2] for part, n in zip(index, tensor.shape, strict=True)]
    start, stop = bounds[-1]
    if start % block or stop % block:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} cannot be split for tensor parallel: its rows are "
            f"{tensor.type.name} blocks of {block} elements and this rank's part starts at {start}"
        )
    cut = index[:-1] + (slice(start // block * block_bytes, stop // block * block_bytes),)
    data = tensor.data[cut]
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)  # a column cut: this rank's blocks of every row, copied
    return GGUFTensor(tensor.name, tensor.type, tuple(b - a for a, b in bounds), data)


def _rank_shard(tp: TensorParallel, tensor: GGUFTensor, path: Path) -> GGUFTensor:
    """This rank's part of a GGUF tensor: the slice ``tp`` plans for the Hugging Face tensor it holds."""
    name, index = tensor.name, None
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if name in _GLOBAL_NAMES:
        index = tp.checkpoint_slice(_GLOBAL_NAMES[name])
    elif match is not None and match.group(2) in _LAYER_NAMES:
        index = tp.checkpoint_slice(f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}")
    elif match is not None and match.group(2) in _EXPERT_PROJECTIONS:
        index = tp.expert_slice(_EXPERT_PROJECTIONS[match.group(2)])
    return tensor if index is None else shard(tensor, index, path)


def _check_shape(path: Path, name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(
            f"{path}: tensor {name!r} has shape {tuple(shape)}, expected {expected} from the metadata"
        )


def _covered(name: str, config: Qwen3Config) -> list[str]:
    """The Hugging Face names a GGUF tensor fills (an experts tensor fills one per expert)."""
    if name in _GLOBAL_NAMES:
        return [_GLOBAL_NAMES[name]]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    layer, rest = match.group(1), match.group(2)  # type: ignore[union-attr] - _target accepted it
    if rest in _LAYER_NAMES:
        return [f"model.layers.{layer}.{_LAYER_NAMES[rest]}"]
    proj = _EXPERT_PROJECTIONS[rest]
    return [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(config.num_experts)]


# --------------------------------------------------------------------------------------------- writing

# What `qwen3 quantize --type` writes: the type of the big matrices, and of the embeddings / output.
QUANT_TYPES = {
    "f32": ("F32", "F32"),
    "bf16": ("BF16", "BF16"),
    "f16": ("F16", "F16"),
    "q8_0": ("Q8_0", "Q8_0"),
    "q5_1": ("Q5_1", "Q8_0"),
    "q5_0": ("Q5_0", "Q8_0"),
    "q4_1": ("Q4_1", "Q8_0"),
    "q4_0": ("Q4_0", "Q8_0"),
}
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
_HF_TO_GGUF = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_HF_LAYER_TO_GGUF = {hf: g for g, hf in _LAYER_NAMES.items()}


def _gguf_tensors(model: Qwen3ForCausalLM) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(GGUF name, float32 tensor, is a matrix to quantize) for every tensor of ``model``."""
    for name, (param, index) in checkpoint_layout(model).items():
        if ".experts." in name:
            continue  # written stacked, below
        if name in _HF_TO_GGUF:
            gguf_name = _HF_TO_GGUF[name]
        else:
            layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()  # type: ignore[union-attr]
            gguf_name = f"blk.{layer}.{_HF_LAYER_TO_GGUF[rest]}"
        tensor = param.detach()[index].float()
        yield gguf_name, tensor, tensor.dim() == 2 and not name.endswith("mlp.gate.weight")
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        size = experts.intermediate_size
        gate_up = experts.gate_up_proj.detach().float()
        yield f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :size], True
        yield f"blk.{i}.ffn_up_exps.weight", gate_up[:, size:], True
        yield f"blk.{i}.ffn_down_exps.weight", experts.down_proj.detach().float(), True


def save_gguf(
    model: Qwen3ForCausalLM,
    tokenizer: Any,
    path: str | os.PathLike,
    quant: str = "q8_0",
    progress: bool = True,
) -> Path:
    """Write ``model`` and ``tokenizer`` as a GGUF file llama.cpp loads (its metadata keys and tensor names).

    ``quant`` (see :data:`QUANT_TYPES`) sets the type of the matrices; norms and the MoE router stay F32 as
    llama.cpp keeps them, and a matrix whose rows do not divide into the type's blocks falls back to F16.
    """
    import gguf

    if quant not in QUANT_TYPES:
        raise ValueError(f"quant type {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    config = model.config
    if config.attention_bias:
        raise ValueError(
            "llama.cpp's qwen3 architectures have no attention biases; this model cannot be written"
        )
    if config.is_moe and not config.norm_topk_prob:
        raise ValueError(
            "llama.cpp assumes norm_topk_prob for qwen3moe; this model (False) would run differently"
        )
    matrix_type, embedding_type = (gguf.GGMLQuantizationType[t] for t in QUANT_TYPES[quant])
    path = Path(path)
    writer = gguf_writer(config, tokenizer, path, _FILE_TYPES[matrix_type.name])
    tensors = list(_gguf_tensors(model))
    for name, tensor, is_matrix in tqdm(
        tensors, desc=f"Writing {quant}", unit="tensor", disable=not progress, leave=False
    ):
        qtype = gguf.GGMLQuantizationType.F32
        if is_matrix:
            qtype = embedding_type if name in ("token_embd.weight", "output.weight") else matrix_type
            if tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf.GGMLQuantizationType.F16
        data = tensor.contiguous().numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)  # shape from bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def gguf_writer(config: Qwen3Config, tokenizer: Any, path: str | os.PathLike, file_type: int) -> Any:
    """A ``gguf.GGUFWriter`` for ``path`` with llama.cpp's metadata for ``config`` and ``tokenizer`` (no tensors
    yet); ``file_type`` is llama.cpp's ``general.file_type`` (its LLAMA_FTYPE number)."""
    import gguf

    arch = "qwen3moe" if config.is_moe else "qwen3"
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(path.stem)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.is_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_feed_forward_length(config.intermediate_size)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
    scaling = config.rope_scaling
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        writer.add_rope_scaling_factor(scaling["factor"])
        if scaling.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config)
    return writer


def _add_tokenizer(writer: Any, tokenizer: Any, config: Qwen3Config) -> None:
    """``tokenizer.ggml.*`` as llama.cpp's converter writes it for Qwen: the vocabulary padded to the
    embedding's rows, control / user-defined / padding token types, merges, ids, the chat template."""
    import json

    spec = json.loads(tokenizer.backend.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [5] * config.vocab_size  # unused
    for token, i in vocab.items():
        tokens[i], types[i] = token, _NORMAL
    for i, token in added.items():
        tokens[i], types[i] = token.content, _CONTROL if token.special else _USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
        writer.add_bos_token_id(tokenizer.pad_token_id)  # as Qwen's files do: <|endoftext|>
    writer.add_add_bos_token(False)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)
