"""qwen3: a Python runtime for the Qwen3 family of hybrid-reasoning language models."""

from qwen3.checkpoint import CheckpointError, load_model, save_model
from qwen3.config import Qwen3Config
from qwen3.hub import ModelNotFoundError
from qwen3.model import Qwen3ForCausalLM, Qwen3MoeForCausalLM, greedy_generate

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ModelNotFoundError",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "load_model",
    "greedy_generate",
    "save_model",
]
