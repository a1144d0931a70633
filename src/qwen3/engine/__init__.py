"""The serving engine: sequences, paged KV cache, scheduler, model runner, and the step loop."""

from qwen3.engine.llm_engine import EngineConfig, LLMEngine, RequestError, StepOutput

__all__ = ["EngineConfig", "LLMEngine", "RequestError", "StepOutput"]
