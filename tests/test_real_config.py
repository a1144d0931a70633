"""Defaults that work for a real Qwen3: a random-weight checkpoint with the official Qwen3-0.6B config.json
(40,960-token context), the real tokenizer, template and generation config — used exactly as a new user
would: ``LLM(folder)`` and ``qwen3 serve --model folder`` with no sizing flags, chat with no max_tokens.

The weights are random except on the output side: the decoder layers write nothing to the residual stream
(o_proj and down_proj are zero) and the embedding rows share one component, larger for <|im_end|>, so that
every reply ends with eos after a few tokens (p ~ 0.3 per token under Qwen3's recommended sampling) instead
of running for 40,960 random tokens. Every layer still computes; the sizing, context, tokenizer, template
and sampling paths are the real ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
import torch

from qwen3.config import Qwen3Config
from qwen3.engine.memory import available_cpu_memory, kv_bytes_per_token
from qwen3.llm import LLM
from qwen3.model import model_class
from tests.live_server import free_port, wait_healthy

EOS = 151645  # <|im_end|>


@pytest.fixture(scope="module")
def real_06b(spec_dir, tmp_path_factory):
    from qwen3.checkpoint import save_model

    raw = json.loads((spec_dir / "qwen3_configs.json").read_text())["models"]["Qwen3-0.6B"]["config.json"]
    config = Qwen3Config.from_dict(raw)
    with torch.device("meta"):
        model = model_class(config)(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16).init_weights(seed=0)
    model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.normal_(0, 0.002, generator=torch.Generator().manual_seed(1))
        embed[:, 0] = 1.0
        embed[EOS, 0] = 1.04
    folder = tmp_path_factory.mktemp("qwen3-0.6b-random")
    save_model(model, folder)
    del model
    (folder / "config.json").write_text(json.dumps(raw, indent=2))  # the official file, as published
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(spec_dir / "tokenizer" / name, folder / name)
    shutil.copy(spec_dir / "hf_qwen3_0.6b" / "generation_config.json", folder / "generation_config.json")
    return folder


def full_context_fits() -> bool:
    """Whether half of this machine's free RAM (the default KV budget) holds one 40,960-token sequence."""
    per_token = kv_bytes_per_token(Qwen3Config(num_hidden_layers=28, num_key_value_heads=8), torch.bfloat16)
    return available_cpu_memory() * 0.5 > 40960 * per_token + (3 << 30)  # weights and their packed copy


def test_llm_chat_with_every_default(real_06b):
    llm = LLM(str(real_06b), progress=False)
    if full_context_fits():
        assert llm.engine.config.max_model_len == 40960
    assert llm.engine.config.max_model_len * 1 <= llm.engine.config.num_blocks * llm.engine.config.block_size
    messages = [{"role": "user", "content": "How many r's are in strawberry?"}]
    outs = llm.chat(
        [messages, messages + [{"role": "assistant", "content": "3"}, {"role": "user", "content": "Sure?"}]]
    )
    for out in outs:
        assert out.finish_reason == "stop" and 1 <= out.usage["completion_tokens"] < 200
        assert out.token_ids[-1] == EOS
    # The recommended thinking-mode sampling was used (no sampling given), max_tokens unset.
    params = llm.recommended_sampling(messages)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.95, 20, None)
    # A request that can never fit is refused; one that asks for exactly the room left is taken.
    prompt = llm.tokenizer.encode("hello")
    with pytest.raises(ValueError, match="max_tokens"):
        llm.engine.check_request(prompt, params.replace(max_tokens=llm.engine.config.max_model_len))
    llm.engine.check_request(prompt, params.replace(max_tokens=llm.engine.config.max_model_len - len(prompt)))


def test_too_small_a_cache_lowers_max_model_len_once_and_serves(real_06b, caplog):
    budget = 2000 * kv_bytes_per_token(
        Qwen3Config(num_hidden_layers=28, num_key_value_heads=8), torch.bfloat16
    )
    with caplog.at_level("WARNING", logger="qwen3.engine.memory"):
        llm = LLM(str(real_06b), kv_cache_memory=budget, progress=False)
    assert llm.engine.config.max_model_len == 2000 // 16 * 16
    warnings = [r.getMessage() for r in caplog.records if "max_model_len lowered" in r.getMessage()]
    assert len(warnings) == 1 and "--kv-cache-memory" in warnings[0] and "--max-model-len" in warnings[0]
    out = llm.chat([{"role": "user", "content": "Hi"}])
    assert out.finish_reason == "stop"
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        LLM(str(real_06b), kv_cache_memory=budget, max_model_len=4096, progress=False)


def test_qwen3_serve_streams_a_chat_with_no_max_tokens(real_06b):
    port = free_port()
    command = [sys.executable, "-m", "qwen3.cli", "serve", "--model", str(real_06b), "--port", str(port)]
    process = subprocess.Popen(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, 120)
        body = {"model": str(real_06b), "messages": [{"role": "user", "content": "Hi!"}], "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes == ["stop"]
        usage = events[-1]["usage"]
        assert 1 <= usage["completion_tokens"] < 200 and usage["prompt_tokens"] > 5
        models = httpx.get(url + "/v1/models").json()
        assert models["data"][0]["max_model_len"] <= 40960
    finally:
        process.terminate()
        process.wait(timeout=30)
