"""The engine's outputs do not depend on batching, caching, preemption or chunking; stops and budgets hold."""

from __future__ import annotations

import pytest
import torch

from qwen3.engine.llm_engine import STOP_THINKING_TEXT, RequestError
from qwen3.llm import LLM
from qwen3.model import greedy_generate
from qwen3.sampling import SamplingParams
from tests.reference import load_reference

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a kingdom far away, there lived a princess who loved mathematics and",
    "def fibonacci(n):\n    ",
    "量子力学是",
    "Q: What is 12 * 7?\nA:",
]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), max_model_len=512, kv_cache_memory="32MiB", progress=False)


def make(tiny_checkpoint, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 512)
    return LLM(str(tiny_checkpoint), progress=False, **kwargs)


def alone(llm: LLM, prompt: str, params=GREEDY) -> list[int]:
    ids = torch.tensor([llm.tokenizer.encode(prompt)])
    return greedy_generate(llm.model, ids, params.max_tokens)[0, ids.shape[1] :].tolist()


def test_batch_equals_each_prompt_alone_and_transformers(llm, tiny_checkpoint):
    outs = llm.generate(PROMPTS, GREEDY)
    ref = load_reference(tiny_checkpoint)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        expected = alone(llm, prompt)
        assert out.token_ids == expected
        ids = torch.tensor([llm.tokenizer.encode(prompt)])
        hf = ref.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
        assert out.token_ids == hf.tolist()
        assert out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_requests_joining_a_running_batch(llm):
    engine = llm.engine
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", llm.tokenizer.encode(prompt), GREEDY)
        tokens[f"r{i}"] = []
        for _ in range(3):  # a few steps run before the next request arrives
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    for i, prompt in enumerate(PROMPTS):
        assert tokens[f"r{i}"] == alone(llm, prompt)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_cache_hits_do_not_change_outputs(tiny_checkpoint):
    llm = make(tiny_checkpoint, kv_cache_memory="32MiB", block_size=8)
    system = "You are a helpful assistant that answers questions about astronomy in great detail. " * 3
    prompts = [system + "What is a pulsar?", system + "Why is Mars red?"]
    first = llm.generate(prompts[:1], GREEDY)[0]
    second = llm.generate(prompts, GREEDY)
    assert second[0].num_cached_tokens > 0 and second[1].num_cached_tokens > 0
    assert llm.engine.blocks.hit_rate > 0
    assert second[0].token_ids == first.token_ids
    assert second[1].token_ids == alone(llm, prompts[1])


def test_preemption_under_a_tiny_kv_budget(tiny_checkpoint):
    llm = make(tiny_checkpoint, kv_cache_memory=20 * 8 * 2 * 2 * 2 * 32 * 4, block_size=8, max_model_len=160)
    assert llm.engine.blocks.num_blocks == 20
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == alone(llm, prompt, params)
    assert llm.engine.blocks.num_free == 20


def test_chunked_prefill(tiny_checkpoint):
    llm = make(tiny_checkpoint, kv_cache_memory="16MiB", max_num_batched_tokens=7)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == alone(llm, prompt)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    solo = llm.generate([PROMPTS[0]], params)[0].token_ids
    crowd = llm.generate(PROMPTS, [params] and params)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True)
    mixed = llm.generate(PROMPTS[:1] * 2, params)[0].token_ids
    assert solo == crowd == mixed
    assert llm.generate([PROMPTS[0]], other)[0].token_ids != solo


def test_n_completions_with_seed(llm):
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=8, seed=7, n=3, ignore_eos=True)
    )[0]
    assert len(out.outputs) == 3
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = llm.generate(
        PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=8, seed=7, n=3, ignore_eos=True)
    )[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_stop_string_across_token_boundaries(llm):
    full = llm.generate(PROMPTS[1], GREEDY)[0]
    # a stop string that starts inside one token and ends inside a later one
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = full.text[start : start + len(pieces[2]) + 2]
    assert len(stop) >= 3
    out = llm.generate(PROMPTS[1], GREEDY.replace(stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]


def test_stop_token_ids_and_eos(llm):
    full = llm.generate(PROMPTS[2], GREEDY)[0]
    target = full.token_ids[5]
    out = llm.generate(PROMPTS[2], GREEDY.replace(stop_token_ids=[target]))[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(target) + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == target
    assert llm.engine.config.eos_token_ids >= {151645, 151643}


def test_max_model_len_stops_with_length(tiny_checkpoint):
    llm = make(tiny_checkpoint, max_model_len=20, kv_cache_memory="8MiB")
    prompt_len = len(llm.tokenizer.encode(PROMPTS[0]))
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and prompt_len + len(out.token_ids) == 20
    with pytest.raises(RequestError, match="prompt"):
        llm.generate("word " * 30, GREEDY)


def test_thinking_budget_inserts_the_stop_thinking_text(llm):
    stop_ids = llm.tokenizer.encode(STOP_THINKING_TEXT)
    engine = llm.engine
    prompt = llm.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    engine.add_request(
        "budget", prompt, GREEDY.replace(max_tokens=40), thinking_budget=5, reasoning_started=True
    )
    ids, inserted = [], []
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.new_token_ids
            inserted += out.inserted_token_ids
    assert ids[5 : 5 + len(stop_ids)] == stop_ids  # exactly after 5 thinking tokens
    assert inserted == stop_ids
    assert len(ids) == 40 and engine.blocks.num_free == engine.blocks.num_blocks


def test_chat_with_budget_splits_reasoning_and_counts_it(llm):
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n<think>\n"
    )
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "Hi"}], params, thinking_budget=3, chat_template=template)
    assert out.reasoning is not None and out.reasoning.endswith("directly now.")
    inserted = llm.tokenizer.encode(STOP_THINKING_TEXT)
    # reasoning runs through </think>; the "\n\n" after it belongs to the answer
    assert out.usage["reasoning_tokens"] == 3 + inserted.index(llm.tokenizer.token_to_id("</think>")) + 1
    assert out.usage["completion_tokens"] == 60 and out.finish_reason == "length"


def test_budget_zero_is_non_thinking_mode(llm):
    out = llm.chat(
        [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=5), thinking_budget=0
    )
    assert out.usage["reasoning_tokens"] == 0


def test_logprobs_match_the_model(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[
        0
    ]
    ids = torch.tensor([llm.tokenizer.encode(PROMPTS[0]) + out.token_ids])
    with torch.no_grad():
        expected = llm.model(ids)[0].float().log_softmax(-1)
    n = len(llm.tokenizer.encode(PROMPTS[0]))
    for i, (chosen, top) in enumerate(out.logprobs):
        row = expected[n - 1 + i]
        assert chosen == pytest.approx(row[out.token_ids[i]].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", llm.tokenizer.encode(PROMPTS[1]), GREEDY)
    engine.step()
    assert engine.blocks.num_used > 0
    assert engine.abort("a") and not engine.abort("a")
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished()


# --- thinking control whatever the template -------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking_2507(spec_dir) -> str:
    return (spec_dir / "templates" / "qwen3_thinking_2507_chat_template.jinja").read_text()


@pytest.mark.parametrize("how", [{"thinking_budget": 0}, {"enable_thinking": False}])
def test_budget_zero_closes_a_template_opened_think_at_once(llm, thinking_2507, how):
    """Thinking-2507's template opens <think> itself; non-thinking must still mean no thinking."""
    messages = [{"role": "user", "content": "Hi"}]
    params = GREEDY.replace(max_tokens=40)
    request = llm.prepare_chat(messages, params, chat_template=thinking_2507, **how)
    assert request.reasoning_started and request.thinking_budget == 0
    out = llm.chat(messages, params, chat_template=thinking_2507, **how)
    stop_ids = llm.tokenizer.encode(STOP_THINKING_TEXT)
    assert out.token_ids[: len(stop_ids)] == stop_ids  # closed before the first sampled token
    assert out.reasoning == STOP_THINKING_TEXT.split("</think>")[0].strip("\n")
    assert out.usage["reasoning_tokens"] == stop_ids.index(llm.tokenizer.token_to_id("</think>")) + 1
    assert len(out.token_ids) == 40 and out.finish_reason == "length"  # the inserted ids count as output
    thinking = llm.chat(messages, params, chat_template=thinking_2507)  # and with thinking on, it thinks
    assert thinking.token_ids[: len(stop_ids)] != stop_ids and thinking.content == ""


def test_budget_zero_with_a_forced_tool_call_on_a_thinking_template(llm, thinking_2507):
    prefix = '<tool_call>\n{"name": "f", "arguments": '
    request = llm.prepare_chat(
        [{"role": "user", "content": "Hi"}], GREEDY, thinking_budget=0, chat_template=thinking_2507,
        answer_prefix=prefix,
    )  # fmt: skip
    assert request.reasoning_started and request.answer_prefix_ids == llm.tokenizer.encode(prefix)
    out = llm.chat(
        [{"role": "user", "content": "Hi"}], GREEDY, thinking_budget=0, chat_template=thinking_2507,
        answer_prefix=prefix,
    )  # fmt: skip
    assert out.text.split("</think>\n\n", 1)[1].startswith(prefix)


# --- tokenizer options -------------------------------------------------------------------------------------


def test_tokenizer_from_another_folder_and_token_ids_only(tiny_checkpoint, tmp_path):
    import shutil

    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, weights_only / name)
    with pytest.raises(FileNotFoundError):
        make(weights_only, kv_cache_memory="8MiB")
    reference = make(tiny_checkpoint, kv_cache_memory="8MiB").generate(PROMPTS[:2], GREEDY)
    separate = make(weights_only, tokenizer=str(tiny_checkpoint), kv_cache_memory="8MiB")
    assert [o.token_ids for o in separate.generate(PROMPTS[:2], GREEDY)] == [o.token_ids for o in reference]
    ids_only = make(weights_only, skip_tokenizer_init=True, kv_cache_memory="8MiB")
    assert ids_only.tokenizer is None
    outs = ids_only.generate([o.prompt_token_ids for o in reference], GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference] and outs[0].text == ""
    assert ids_only.engine.config.eos_token_ids >= {151645, 151643}  # from generation_config.json
    with pytest.raises(ValueError, match="tokenizer"):
        ids_only.generate("text", GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        ids_only.chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        ids_only.generate([[1, 2, 3]], GREEDY.replace(stop=["x"]))
    with pytest.raises(RequestError, match="thinking_budget"):
        ids_only.engine.add_request("b", [1, 2, 3], GREEDY, thinking_budget=4)


# --- one request cannot hurt another ------------------------------------------------------------------


def test_a_request_that_breaks_the_step_fails_alone(llm, monkeypatch):
    """A step that raises is retried sequence by sequence: the culprit fails, the others are unchanged."""
    expected = {p: alone(llm, p) for p in PROMPTS}
    engine = llm.engine
    real_run = engine.runner.run

    def run(scheduled):
        if any(seq.request_id == "poison" for seq, _ in scheduled):
            raise RuntimeError("boom")
        return real_run(scheduled)

    monkeypatch.setattr(engine.runner, "run", run)
    engine.add_request("poison", llm.tokenizer.encode("poisoned prompt"), GREEDY)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", llm.tokenizer.encode(prompt), GREEDY)
    tokens: dict[str, list[int]] = {}
    finish: dict[str, tuple] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finish[out.request_id] = (out.finish_reason, out.error)
    assert finish["poison"] == ("error", "RuntimeError: boom") and tokens["poison"] == []
    for i, prompt in enumerate(PROMPTS):
        assert tokens[f"r{i}"] == expected[prompt] and finish[f"r{i}"] == ("length", None)
    assert engine.blocks.num_free == engine.blocks.num_blocks and len(engine.runner.batch) == 0


def test_a_failed_sampling_rewinds_the_seeded_generators(llm, monkeypatch):
    """The sampler fails after drawing for everyone: the retry alone gives each seeded request the tokens
    it gets without the culprit (its generator was rewound), and the culprit fails."""
    seeded = SamplingParams(temperature=1.0, top_k=40, max_tokens=12, seed=5, ignore_eos=True)
    expected = llm.generate(PROMPTS, seeded)
    engine, real = llm.engine, llm.engine.sampler

    def sampler(logits, batch):
        result = real(logits, batch)  # every seeded row has drawn its noise by now
        if "poison" in batch.request_ids:
            raise RuntimeError("late failure")
        return result

    monkeypatch.setattr(engine, "sampler", sampler)
    engine.add_request("poison", llm.tokenizer.encode("poisoned"), seeded)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", llm.tokenizer.encode(prompt), seeded.replace(seed=5))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens["poison"] == []
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == [o.token_ids for o in expected]
    assert len(engine.runner.batch) == 0 and engine.blocks.num_free == engine.blocks.num_blocks


def test_offline_outputs_say_why_a_request_failed(llm, monkeypatch):
    real_run = llm.engine.runner.run
    poison = llm.tokenizer.encode("poisoned prompt")

    def run(scheduled):
        if any(seq.token_ids[: len(poison)] == poison for seq, _ in scheduled):
            raise ValueError("bad row")
        return real_run(scheduled)

    monkeypatch.setattr(llm.engine.runner, "run", run)
    bad, good = llm.generate([poison, llm.tokenizer.encode(PROMPTS[0])], GREEDY)
    assert (bad.finish_reason, bad.outputs[0].error) == ("error", "ValueError: bad row")
    assert good.finish_reason == "length" and good.token_ids == alone(llm, PROMPTS[0])


def test_inserted_ids_count_against_the_context(tiny_checkpoint, thinking_2507):
    """Budget 0 on a template that opens <think> appends the stop-thinking text: a prompt that leaves no
    room for it is refused at the door, instead of failing (or waiting forever) inside the engine."""
    small = make(tiny_checkpoint, max_model_len=64, kv_cache_memory=64 * 2 * 2 * 2 * 32 * 4)
    assert small.engine.config.num_blocks * 16 == 64  # the cache holds exactly one context
    inserted = len(small.tokenizer.encode(STOP_THINKING_TEXT))
    room = (
        64
        - inserted
        - len(small.tokenizer.encode("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n"))
    )
    fits = [{"role": "user", "content": "a" * (room - 2)}]
    too_long = [{"role": "user", "content": "a " * room}]
    out = small.chat(fits, GREEDY.replace(max_tokens=None), thinking_budget=0, chat_template=thinking_2507)
    assert out.finish_reason == "length" and len(out.token_ids) >= inserted
    with pytest.raises(RequestError, match="more to close the thinking"):
        small.chat(too_long, GREEDY.replace(max_tokens=None), thinking_budget=0, chat_template=thinking_2507)
    assert not small.engine.has_unfinished()


def test_torch_decode_gathers_are_bounded(tiny_checkpoint, monkeypatch):
    from qwen3.engine import attention

    monkeypatch.setattr(attention, "DECODE_GATHER_KEYS", 64)  # a group or two of decodes per call
    torch_llm = make(tiny_checkpoint, kv_cache_memory="8MiB", attention_backend="torch")
    outs = torch_llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [alone(torch_llm, p) for p in PROMPTS]
