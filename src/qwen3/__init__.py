"""qwen3: a Python runtime for the Qwen3 family of hybrid-reasoning language models."""

from qwen3 import chat
from qwen3.checkpoint import CheckpointError, load_model, save_model
from qwen3.config import Qwen3Config
from qwen3.hub import ModelNotFoundError
from qwen3.llm import LLM, ChatOutput, RequestOutput
from qwen3.model import Qwen3ForCausalLM, Qwen3MoeForCausalLM, greedy_generate
from qwen3.sampling import SamplingParams
from qwen3.structured import StructuredOutputs
from qwen3.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ChatOutput",
    "CheckpointError",
    "ModelNotFoundError",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputs",
    "Tokenizer",
    "chat",
    "greedy_generate",
    "load_model",
    "save_model",
]
