"""KV-cache sizing for every released Qwen3 config (built on the meta device: nothing is allocated)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from qwen3 import device
from qwen3.config import Qwen3Config
from qwen3.engine import memory
from qwen3.engine.memory import KVCacheError, available_cpu_memory, kv_bytes_per_token, plan_kv_cache
from qwen3.model import model_class

GiB = 1 << 30


@pytest.fixture(scope="module")
def releases(spec_dir) -> dict[str, Qwen3Config]:
    models = json.loads((spec_dir / "qwen3_configs.json").read_text())["models"]
    return {name: Qwen3Config.from_dict(entry["config.json"]) for name, entry in models.items()}


def weight_bytes(config: Qwen3Config) -> int:
    with torch.device("meta"):
        model = model_class(config)(config)
    return sum(p.numel() for p in model.parameters()) * 2  # bf16


def test_every_release(releases, caplog):
    assert len(releases) == 8
    for name, config in releases.items():
        per_token = kv_bytes_per_token(config, torch.bfloat16)
        # Qwen3: 2 (k, v) x layers x 8 kv heads (4 for the 235B) x 128 x 2 bytes
        assert per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * 128 * 2, name
        assert config.context_length == 40960, name
        weights = weight_bytes(config)
        assert weights > 0.5e9, name
        # A machine where half the RAM left after the weights holds 3 full contexts: all of it, no warning.
        ram_left = 6 * 40960 * per_token
        with caplog.at_level(logging.WARNING, logger="qwen3.engine.memory"):
            caplog.clear()
            plan = plan_kv_cache(config, torch.bfloat16, ram_left // 2, "test")
        assert plan.max_model_len == 40960 and plan.num_blocks * 16 >= 3 * 40960, name
        assert plan.memory_bytes <= ram_left // 2 and not caplog.records, name
        # A 24 GiB laptop: the context shrinks to what fits (when the weights fit at all), and says so once.
        left = 24 * GiB - 2 * weights  # weights plus the kernels' packed copy
        if left <= 0:
            continue
        with caplog.at_level(logging.WARNING, logger="qwen3.engine.memory"):
            caplog.clear()
            plan = plan_kv_cache(config, torch.bfloat16, left // 2, "test")
        fits = plan.num_blocks * 16
        assert plan.max_model_len == min(40960, fits), name
        lowered = [r for r in caplog.records if "lowered" in r.getMessage()]
        assert len(lowered) == (1 if fits < 40960 else 0), name


def test_an_explicit_max_model_len_is_checked_at_start_up(releases):
    config = releases["Qwen3-8B"]
    per_token = kv_bytes_per_token(config, torch.bfloat16)
    plan = plan_kv_cache(config, torch.bfloat16, 10000 * per_token, "test", max_model_len=8192)
    assert plan.max_model_len == 8192 and plan.num_blocks == 10000 // 16
    with pytest.raises(KVCacheError, match="does not fit the KV cache.*--max-model-len"):
        plan_kv_cache(config, torch.bfloat16, 4000 * per_token, "test", max_model_len=8192)
    with pytest.raises(KVCacheError, match="exceeds the model's context"):
        plan_kv_cache(config, torch.bfloat16, 10**12, "test", max_model_len=50000)
    with pytest.raises(KVCacheError, match="raise --kv-cache-memory"):
        plan_kv_cache(config, torch.bfloat16, 10 * per_token, "test")


def test_budget_is_capped_at_what_the_sequences_can_use(releases):
    config = releases["Qwen3-0.6B"]
    plan = plan_kv_cache(config, torch.bfloat16, 10**15, "test", max_num_seqs=4)
    assert plan.num_blocks == 4 * 40960 // 16
    plan = plan_kv_cache(config, torch.bfloat16, 10**15, "test", max_num_seqs=2, max_model_len=1000)
    assert plan.num_blocks == 2 * 63 and plan.max_model_len == 1000


def test_yarn_extends_the_context(releases):
    raw = releases["Qwen3-8B"].to_dict()
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    config = Qwen3Config.from_dict(raw)
    assert config.context_length == 131072
    plan = plan_kv_cache(config, torch.bfloat16, 10**13, "test", max_num_seqs=1)
    assert plan.max_model_len == 131072


def test_default_budget_on_cpu(monkeypatch):
    total = available_cpu_memory()
    assert total > 0
    monkeypatch.setattr(memory, "available_cpu_memory", lambda: 20 * GiB)
    assert memory.default_budget(torch.device("cpu")) == (10 * GiB, "0.5 of the 20.0 GiB of RAM available")
    assert memory.default_budget(torch.device("cpu"), fraction=0.25)[0] == 5 * GiB


def test_cgroup_limit_caps_the_ram(monkeypatch, tmp_path):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(str(4 * GiB))
    usage.write_text(str(1 * GiB))
    real_read = device._read_int

    def read(path):
        name = str(path)
        if name == "/sys/fs/cgroup/memory.max":
            return real_read(limit)
        if name == "/sys/fs/cgroup/memory.current":
            return real_read(usage)
        return None

    monkeypatch.setattr(device, "_read_int", read)
    assert available_cpu_memory() <= 3 * GiB
