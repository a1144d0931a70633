"""The serving engine core: sequences, KV blocks, scheduler, input batch, attention backends, model runner, step loop."""

from qwen3.engine.llm_engine import EngineConfig, EngineOutput, LLMEngine, RequestError

__all__ = ["EngineConfig", "EngineOutput", "LLMEngine", "RequestError"]
