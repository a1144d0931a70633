"""The streaming interface: deltas add up to the offline result; leaving a stream aborts and frees."""

from __future__ import annotations

import asyncio

import pytest

from qwen3.async_llm import AsyncLLM
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
