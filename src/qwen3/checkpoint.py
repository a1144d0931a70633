"""Load and save Hugging Face-format Qwen3 checkpoints (config.json + safetensors), bit for bit.

Weights are only ever read from safetensors: a folder holding only ``pytorch_model.bin`` is refused
rather than unpickled. Every way a checkpoint can be wrong (unknown architecture, missing or extra
tensor, wrong shape or dtype, corrupt or truncated file, index naming a missing shard) raises
:class:`CheckpointError` naming the file and the tensor, before the model is returned.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qwen3.config import ConfigError, Qwen3Config, parse_dtype
from qwen3.device import check_weights_fit
from qwen3.gguf_checkpoint import is_gguf, load_gguf_model
from qwen3.hub import CheckpointError, file_in, read_json, resolve_model_dir
from qwen3.model import Qwen3ForCausalLM, checkpoint_layout, iter_checkpoint_tensors, model_class

if TYPE_CHECKING:
    from qwen3.distributed import TensorParallel

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
# Tensors some exporters add that carry nothing the model needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FP8_SCALE = ".weight_scale_inv"  # Qwen's FP8 checkpoints: one float scale per weight block
_AWQ_PARTS = (".qzeros", ".scales")  # AWQ checkpoints: beside each <prefix>.qweight
_COMPANIONS = (_FP8_SCALE, *_AWQ_PARTS)  # tensors read with the weight they describe
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM packing: nibble i of an int32 holds output column ORDER[i]


__all__ = ["CheckpointError", "load_model", "save_model", "weight_files"]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: one file, or the shards its index lists."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
        shards = []
        for tensor, shard in weight_map.items():
            if not file_in(folder, shard, index).is_file():
                raise CheckpointError(
                    f"{index}: tensor {tensor!r} is in shard {shard!r}, which does not exist"
                )
            if shard not in shards:
                shards.append(shard)
        return [folder / s for s in shards]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)"
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint if pickled else ''}")


def load_config(folder: Path) -> Qwen3Config:
    try:
        return Qwen3Config.from_file(folder / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def load_model(
    source: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tp: TensorParallel | None = None,
) -> Qwen3ForCausalLM:
    """Load a Qwen3 or Qwen3-MoE checkpoint from a local folder or a Hugging Face Hub repo id.

    ``dtype`` None keeps the checkpoint's own dtype (config ``torch_dtype``/``dtype``, else float32),
    so weights arrive bit for bit; another dtype converts them. The model is returned in eval mode.
    A ``.gguf`` file (or ``owner/repo:FILE.gguf``) is read by :mod:`qwen3.gguf_checkpoint`.
    ``tp`` (tensor parallel): build and read this rank's shard only, each tensor's slice straight from the file
    (safetensors' ``get_slice``; a GGUF tensor's rows or blocks, see :func:`qwen3.gguf_checkpoint.shard`).
    """
    if is_gguf(source):
        return load_gguf_model(source, dtype, device, progress, tp)
    folder = resolve_model_dir(source)
    config = load_config(folder)
    target_dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    files = weight_files(folder)
    shards = tp.size if tp else 1
    check_weights_fit(config.num_parameters() // shards, target_dtype, device, folder / "config.json")
    with torch.device("meta"):
        model = model_class(config)(config, tp)
    model = model.to_empty(device=device).to(target_dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    fill_parameters(model, files, progress=progress)
    return model.eval()


def fill_parameters(model: Qwen3ForCausalLM, files: list[Path], progress: bool = True) -> None:
    """Copy every checkpoint tensor into its slice of the model, checking names, shapes and dtypes.

    Quantized weights are dequantized on the way (their companion tensors may be in another shard):
    FP8 (float8_e4m3fn with a ``weight_scale_inv`` per block): ``W[block] = fp8.float() * scale[block]``;
    AWQ (``qweight``/``qzeros``/``scales``, 4-bit GEMM packing): ``W.T = (q - zero) * scale`` per group.
    Under tensor parallel (``model.tp``) each tensor's slice for this rank is read with ``get_slice``: the
    rest of the tensor is never read into memory.
    """
    tp = model.tp
    layout = checkpoint_layout(model)
    seen: dict[str, Path] = {}
    names = {path: _tensor_names(path) for path in files}
    companions = {n: path for path, found in names.items() for n in found if n.endswith(_COMPANIONS)}
    used: set[str] = set()
    bar = tqdm(
        total=sum(map(len, names.values())),
        desc="Loading weights",
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    bar.update()
                    if name in seen:
                        raise CheckpointError(f"{path}: tensor {name!r} is also in {seen[name]}")
                    seen[name] = path
                    if name in companions:
                        continue  # read with its weight
                    if tp is not None and not tp.holds(name):
                        continue  # an expert another rank holds (expert parallel)
                    awq = name.endswith(".qweight")
                    if tp is not None and awq:
                        raise CheckpointError(
                            f"{path}: tensor parallel does not load AWQ weights yet ({name!r})"
                        )
                    if awq:  # the weight it packs, under the name the model knows
                        name = name.removesuffix(".qweight") + ".weight"
                        if name in seen:
                            raise CheckpointError(
                                f"{path}: tensor {name!r} is also in {seen[name]} (packed here)"
                            )
                        seen[name] = path
                    if name not in layout:
                        if name.endswith(_IGNORED_SUFFIXES) or (
                            name == "lm_head.weight" and model.config.tie_word_embeddings
                        ):
                            continue
                        raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of this model)")
                    param, index = layout[name]
                    target = param.data[index]
                    if awq:
                        prefix = name.removesuffix(".weight")
                        tensor = _dequantize_awq(
                            model.config, path, prefix, f.get_tensor(prefix + ".qweight"), companions
                        )
                        used.update(prefix + part for part in _AWQ_PARTS)
                    elif tp is not None and (part := tp.checkpoint_slice(name)) is not None:
                        tensor = f.get_slice(name)[part]
                    else:
                        tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(target.shape)} from config.json"
                        )
                    if tensor.dtype == torch.float8_e4m3fn:
                        if tp is not None:
                            raise CheckpointError(
                                f"{path}: tensor parallel does not load FP8 weights yet ({name!r})"
                            )
                        tensor = _dequantize_fp8(model.config, path, name, tensor, companions)
                        used.add(name + "_scale_inv")
                    elif tensor.dtype not in _FLOAT_DTYPES:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype "
                            f"(checkpoint declares {model.config.torch_dtype})"
                        )
                    target.copy_(tensor)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error type for corrupt/truncated files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    bar.close()
    stray = sorted(set(companions) - used)
    if stray:
        raise CheckpointError(
            f"{companions[stray[0]]}: unexpected tensor {stray[0]!r} (no quantized weight of its prefix)"
        )
    missing = [name for name in layout if name not in seen]
    if missing:
        where = ", ".join(p.name for p in files)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{more}")


def _dequantize_fp8(
    config: Qwen3Config, path: Path, name: str, weight: torch.Tensor, companions: dict[str, Path]
) -> torch.Tensor:
    """One FP8 block-quantized weight as float32, its scale checked against config.json's block size."""
    block = config.fp8_block
    if block is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} is float8, but config.json has no fp8 quantization_config"
        )
    scale_name = name + "_scale_inv"
    scale = _companion(companions, scale_name, name, path)
    rows, cols = weight.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != expected or scale.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{companions[scale_name]}: tensor {scale_name!r} has shape {tuple(scale.shape)} and dtype {scale.dtype}, "
            f"expected a float {expected} for blocks of {block[0]}x{block[1]}"
        )
    grid = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * grid


def _companion(companions: dict[str, Path], name: str, of: str, path: Path) -> torch.Tensor:
    if name not in companions:
        raise CheckpointError(f"{path}: tensor {of!r} is quantized but its {name!r} is missing")
    with safe_open(companions[name], framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _dequantize_awq(
    config: Qwen3Config, path: Path, prefix: str, qweight: torch.Tensor, companions: dict[str, Path]
) -> torch.Tensor:
    """One AWQ (GEMM) weight as float32 ``[out, in]``: ``qweight`` int32 ``[in, out/8]`` and ``qzeros``
    int32 ``[in/group, out/8]`` pack eight 4-bit values each in AWQ's column order; ``scales`` ``[in/group,
    out]``."""
    group = config.awq_group_size
    if group is None:
        raise CheckpointError(
            f"{path}: tensor {prefix + '.qweight'!r} is AWQ, but config.json has no awq quantization_config"
        )
    qzeros = _companion(companions, prefix + ".qzeros", prefix + ".qweight", path)
    scales = _companion(companions, prefix + ".scales", prefix + ".qweight", path)
    rows, packed = qweight.shape
    out = packed * 8
    if (
        qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or scales.dtype not in _FLOAT_DTYPES
        or rows % group or tuple(qzeros.shape) != (rows // group, packed) or tuple(scales.shape) != (rows // group, out)
    ):  # fmt: skip
        raise CheckpointError(
            f"{path}: AWQ tensors of {prefix!r} do not fit together: qweight {tuple(qweight.shape)} {qweight.dtype}, "
            f"qzeros {tuple(qzeros.shape)} {qzeros.dtype}, scales {tuple(scales.shape)} {scales.dtype} (group {group})"
        )
    weight = _unpack_awq(qweight)
    zeros = _unpack_awq(qzeros).repeat_interleave(group, 0)
    return ((weight - zeros).float() * scales.float().repeat_interleave(group, 0)).T


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[r, c]`` of eight 4-bit values each -> ``[r, 8c]`` in output-column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed[:, :, None] >> shifts) & 0xF  # [r, c, 8]: nibble i is column ORDER[i] of its 8
    order = torch.tensor(AWQ_ORDER)
    columns = torch.empty_like(nibbles)
    columns[:, :, order] = nibbles
    return columns.reshape(packed.shape[0], -1)


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def save_model(
    model: Qwen3ForCausalLM, folder: str | os.PathLike, max_shard_bytes: int | None = None
) -> Path:
    """Write config.json and safetensors weights (sharded with an index past ``max_shard_bytes``).

    The output is an ordinary Hugging Face checkpoint: transformers' ``from_pretrained`` loads it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = {name: t.contiguous().cpu() for name, t in iter_checkpoint_tensors(model)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata=metadata)
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / shard_name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, shard_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder
