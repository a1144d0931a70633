"""The streaming interface: deltas add up to the offline result; leaving a stream aborts and frees."""

from __future__ import annotations

import asyncio
import time

import pytest

from qwen3.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from qwen3.engine.llm_engine import RequestError
from qwen3.llm import LLM
from qwen3.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def front(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), max_model_len=256, kv_cache_memory="16MiB", progress=False)
    front = AsyncLLM(llm)
    yield front
    front.shutdown()


def collect(front: AsyncLLM, prompts: list[str], params=GREEDY):
    async def one(prompt: str):
        deltas = [d async for d in front.stream(front.llm.tokenizer.encode(prompt), params)]
        return deltas

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(main())


def test_concurrent_streams_equal_offline_generation(front):
    prompts = ["Hello world", "Streaming tokens one by one is", "数学"]
    streams = collect(front, prompts)
    offline = front.llm.generate(prompts, GREEDY)
    for deltas, out in zip(streams, offline, strict=True):
        assert [t for d in deltas for t in d.token_ids] == out.token_ids
        assert "".join(d.text for d in deltas) == out.text
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].usage["completion_tokens"] == 20
        assert not any(d.finished for d in deltas[:-1])
    assert front.engine.blocks.num_free == front.engine.blocks.num_blocks


def test_leaving_a_stream_aborts_and_frees_blocks(front):
    async def main():
        ids = front.llm.tokenizer.encode("A long story begins")
        agen = front.stream(ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(100):
            if not front.engine.has_unfinished():
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert not front.engine.has_unfinished()
    assert front.engine.blocks.num_free == front.engine.blocks.num_blocks


def test_bad_request_raises_from_the_stream(front):
    async def main():
        async for _ in front.stream([], GREEDY):
            pass

    with pytest.raises(RequestError, match="prompt"):
        asyncio.run(main())


def test_chat_stream_splits_reasoning_and_content(front):
    llm = front.llm
    template = "<|im_start|>user\n{{ messages[0].content }}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    request = llm.prepare_chat([{"role": "user", "content": "Hi"}], GREEDY.replace(max_tokens=40),
                               thinking_budget=4, chat_template=template)  # fmt: skip
    deltas = list(front.stream_chat_sync(request))
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    offline = llm.chat([{"role": "user", "content": "Hi"}], GREEDY.replace(max_tokens=40), thinking_budget=4,
                       chat_template=template)  # fmt: skip
    assert reasoning == offline.reasoning and content == offline.content
    assert "Considering the limited time" in reasoning  # the inserted text streams as reasoning


def test_a_closed_consumer_loop_fails_only_its_request(front):
    """A stream whose event loop is gone is aborted; streams on live loops go on."""
    ids = front.llm.tokenizer.encode("Abandoned")
    dead_loop = asyncio.new_event_loop()
    agen = front.stream(ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    dead_loop.run_until_complete(agen.__anext__())
    dead_loop.close()  # its consumer never comes back, and never closes the generator
    survivors = collect(front, ["Hello world"])
    assert survivors[0][-1].finished and sum(len(d.token_ids) for d in survivors[0]) == 20
    for _ in range(200):
        if not front.engine.has_unfinished():
            break
        time.sleep(0.02)
    assert not front.engine.has_unfinished()
    assert front.engine.blocks.num_free == front.engine.blocks.num_blocks


def test_a_failing_request_and_a_dead_engine(tiny_checkpoint, monkeypatch):
    llm = LLM(str(tiny_checkpoint), max_model_len=256, kv_cache_memory="8MiB", progress=False)
    front = AsyncLLM(llm)
    real_run = llm.engine.runner.run

    def run(scheduled):
        if any(seq.request_id == "bad" for seq, _ in scheduled):
            raise RuntimeError("only this one")
        return real_run(scheduled)

    monkeypatch.setattr(llm.engine.runner, "run", run)

    async def main():
        async def consume(request_id: str):
            return [d async for d in front.stream(llm.tokenizer.encode("Hi"), GREEDY, request_id)]

        return await asyncio.gather(consume("bad"), consume("good"), return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, RequestFailedError) and "only this one" in str(bad)
    assert good[-1].finish_reason == "length" and front.is_alive()

    def broken_step():
        raise SystemError("broken")

    monkeypatch.setattr(llm.engine, "step", broken_step)

    async def waiting():
        return [d async for d in front.stream(llm.tokenizer.encode("Hi"), GREEDY)]

    with pytest.raises(EngineDeadError, match="broken"):
        asyncio.run(waiting())
    assert not front.is_alive()
    with pytest.raises(EngineDeadError):
        asyncio.run(waiting())
    front.shutdown()


def test_budget_zero_streams_like_offline_on_a_thinking_template(front, spec_dir):
    template = (spec_dir / "templates" / "qwen3_thinking_2507_chat_template.jinja").read_text()
    llm, params = front.llm, GREEDY.replace(max_tokens=40)
    messages = [{"role": "user", "content": "Hi"}]
    request = llm.prepare_chat(messages, params, thinking_budget=0, chat_template=template)
    deltas = list(front.stream_chat_sync(request))
    offline = llm.chat(messages, params, thinking_budget=0, chat_template=template)
    assert "".join(d.reasoning for d in deltas) == offline.reasoning
    assert "".join(d.content for d in deltas) == offline.content
    assert offline.reasoning.startswith("Considering the limited time")


def test_finish_all_ends_every_stream_cleanly_and_later_ones_at_once(tiny_checkpoint):
    """What a draining server uses: running streams get a last "abort" delta with their usage, blocks are
    freed, and a request added afterwards finishes at once instead of running past the shutdown."""
    llm = LLM(str(tiny_checkpoint), max_model_len=256, kv_cache_memory="16MiB", progress=False)
    front = AsyncLLM(llm)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        ids = llm.tokenizer.encode("A long story begins")
        running = front.stream(ids, long)
        first = await running.__anext__()
        front.finish_all("abort")
        rest = [d async for d in running]
        late = [d async for d in front.stream(ids, long)]
        return first, rest, late

    try:
        first, rest, late = asyncio.run(main())
    finally:
        front.shutdown()
    assert not first.finished and rest[-1].finished and rest[-1].finish_reason == "abort"
    assert rest[-1].usage["completion_tokens"] < 200
    assert len(late) == 1 and late[0].finish_reason == "abort" and late[0].token_ids == []
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
