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

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from qwen3.config import ConfigError, Qwen3Config, parse_dtype
from qwen3.device import check_weights_fit
from qwen3.gguf_checkpoint import is_gguf, load_gguf_model
from qwen3.hub import CheckpointError, file_in, read_json, resolve_model_dir
from qwen3.model import Qwen3ForCausalLM, checkpoint_layout, iter_checkpoint_tensors, model_class

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
# Tensors some exporters add that carry nothing the model needs (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FP8_SCALE = ".weight_scale_inv"  # Qwen's FP8 checkpoints: one float scale per weight block


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
) -> Qwen3ForCausalLM:
    """Load a Qwen3 or Qwen3-MoE checkpoint from a local folder or a Hugging Face Hub repo id.

    ``dtype`` None keeps the checkpoint's own dtype (config ``torch_dtype``/``dtype``, else float32),
    so weights arrive bit for bit; another dtype converts them. The model is returned in eval mode.
    A ``.gguf`` file (or ``owner/repo:FILE.gguf``) is read by :mod:`qwen3.gguf_checkpoint`.
    """
    if is_gguf(source):
        return load_gguf_model(source, dtype, device, progress)
    folder = resolve_model_dir(source)
    config = load_config(folder)
    target_dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    files = weight_files(folder)
    check_weights_fit(config.num_parameters(), target_dtype, device, folder / "config.json")
    with torch.device("meta"):
        model = model_class(config)(config)
    model = model.to_empty(device=device).to(target_dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    fill_parameters(model, files, progress=progress)
    return model.eval()


def fill_parameters(model: Qwen3ForCausalLM, files: list[Path], progress: bool = True) -> None:
    """Copy every checkpoint tensor into its slice of the model, checking names, shapes and dtypes.

    FP8 weights (float8_e4m3fn, with a ``weight_scale_inv`` per block, possibly in another shard) are
    dequantized on the way: ``W[block] = fp8.float() * weight_scale_inv[block]``.
    """
    layout = checkpoint_layout(model)
    seen: dict[str, Path] = {}
    names = {path: _tensor_names(path) for path in files}
    scales = {n: path for path, found in names.items() for n in found if n.endswith(_FP8_SCALE)}
    used_scales: set[str] = set()
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
                    if name in scales:
                        continue  # read with its weight
                    if name not in layout:
                        if name.endswith(_IGNORED_SUFFIXES) or (
                            name == "lm_head.weight" and model.config.tie_word_embeddings
                        ):
                            continue
                        raise CheckpointError(f"{path}: unexpected tensor {name!r} (not part of this model)")
                    param, index = layout[name]
                    target = param.data[index]
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(target.shape)} from config.json"
                        )
                    if tensor.dtype == torch.float8_e4m3fn:
                        tensor = _dequantize_fp8(model.config, path, name, tensor, scales)
                        used_scales.add(name + "_scale_inv")
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
    stray = sorted(set(scales) - used_scales)
    if stray:
        raise CheckpointError(f"{scales[stray[0]]}: unexpected tensor {stray[0]!r} (scales no float8 weight)")
    missing = [name for name in layout if name not in seen]
    if missing:
        where = ", ".join(p.name for p in files)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{more}")


def _dequantize_fp8(
    config: Qwen3Config, path: Path, name: str, weight: torch.Tensor, scales: dict[str, Path]
) -> torch.Tensor:
    """One FP8 block-quantized weight as float32, its scale checked against config.json's block size."""
    block = config.fp8_block
    if block is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} is float8, but config.json has no fp8 quantization_config"
        )
    scale_name = name + "_scale_inv"
    if scale_name not in scales:
        raise CheckpointError(f"{path}: tensor {name!r} is float8 but its {scale_name!r} is missing")
    with safe_open(scales[scale_name], framework="pt", device="cpu") as f:
        scale = f.get_tensor(scale_name)
    rows, cols = weight.shape
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != expected or scale.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{scales[scale_name]}: tensor {scale_name!r} has shape {tuple(scale.shape)} and dtype {scale.dtype}, "
            f"expected a float {expected} for blocks of {block[0]}x{block[1]}"
        )
    grid = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * grid


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
