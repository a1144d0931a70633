"""Resolve a model ``source`` (local folder or Hugging Face Hub repo id) to a local folder.

Everything that reads a checkpoint or a tokenizer goes through :func:`resolve_model_dir`, so the
rules (local first, then the Hub cache, ``HF_HUB_OFFLINE`` honoured, clear errors) live in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Files a Qwen3 folder may need: config, weights (single or sharded), tokenizer, generation config.
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.jinja",
    "*.gguf",
]


class ModelNotFoundError(FileNotFoundError):
    """The source is neither a local folder nor a Hub repo that can be reached or is cached."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded (config, weights, tokenizer, template); the message names
    the file and, where it applies, the field or tensor."""


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict ({} when absent and not ``required``); anything unreadable or
    not a JSON object raises :class:`CheckpointError` naming the file."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: no such file")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, not a {type(data).__name__}")
    return data


def file_in(folder: Path, name: object, source: Path) -> Path:
    """``folder / name`` for a file name some checkpoint file (``source``) gives, refused unless it stays
    inside the folder: a relative path without ``..``. (Symlinks inside the folder are the folder's own
    business; the Hub cache is made of them.)"""
    parts = Path(name).parts if isinstance(name, str) and name else ()
    if not parts or Path(name).is_absolute() or ".." in parts or any(c in name for c in "\\\0"):
        raise CheckpointError(f"{source}: {name!r} is not a file name inside {folder}")
    return folder / name


def resolve_model_dir(source: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder holding ``source``'s files.

    ``source`` is a local folder, or a Hub repo id such as ``Qwen/Qwen3-0.6B`` fetched with
    ``huggingface_hub.snapshot_download`` (its cache is reused; with ``HF_HUB_OFFLINE=1`` only the
    cache is consulted). A missing folder or an unreachable, uncached repo raises
    :class:`ModelNotFoundError` with a message that says what was tried.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    looks_like_repo_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_repo_id:
        raise ModelNotFoundError(f"model source {text!r} is not a folder and not a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFoundError(f"cannot fetch {text!r}: huggingface_hub is not installed") from exc
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns or MODEL_FILE_PATTERNS))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ModelNotFoundError(
            f"model {text!r} is not in the local Hugging Face cache and {why}; "
            f"download it where there is network (huggingface-cli download {text}) or pass a local folder"
        ) from exc
    except (RepositoryNotFoundError, HFValidationError) as exc:
        raise ModelNotFoundError(f"model {text!r}: no such repo on the Hugging Face Hub ({exc})") from exc
    except OSError as exc:
        raise ModelNotFoundError(f"model {text!r} could not be fetched: {exc}") from exc
