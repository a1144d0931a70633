"""Batch invariance: a request's logits are the same bits whatever else is in the step.

Forty requests (twenty prompts of 3 to 300 tokens, each greedy and seeded) run alone, all together, with
tiny prefill chunks, with prefix-cache hits and under preemption; every logits row each request ever
gets must be bitwise identical across the runs, and so the tokens. In bf16 and float32, dense and MoE, on
the CPU kernels (the default) and on the torch path with ``batch_invariant=True`` (what CUDA runs; here
with the kernels switched off).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from qwen3 import kernels
from qwen3.llm import LLM
from qwen3.sampling import SamplingParams
from tests.reference import make_hf_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(
    temperature=1.0, top_k=50, top_p=0.9, max_tokens=12, ignore_eos=True, presence_penalty=0.5
)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(42)
    lengths = [3, 300, 17, 64, 5, 129, 33, 1, 250, 16, 90, 7, 48, 200, 12, 31, 160, 2, 75, 111]
    shared = torch.randint(0, vocab, (40,), generator=g).tolist()  # some prompts share a 40-token prefix
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(shared + ids if i % 4 == 0 else ids)
    return out


def requests(vocab: int) -> list[tuple[str, list[int], SamplingParams]]:
    out = []
    for i, ids in enumerate(prompts(vocab)):
        out.append((f"greedy{i}", ids, GREEDY))
        out.append((f"seeded{i}", ids, SEEDED.replace(seed=1000 + i)))
    return out


def run(llm: LLM, reqs, together: bool = True) -> tuple[dict[str, list[int]], dict[str, list[torch.Tensor]]]:
    """Every request's tokens and every logits row it was sampled from."""
    engine = llm.engine
    logits: dict[str, list[torch.Tensor]] = defaultdict(list)
    real_run = engine.runner.run

    def recording_run(scheduled):
        sampled, rows = real_run(scheduled)
        for seq, row in zip(sampled, rows, strict=True):
            logits[seq.request_id].append(row.clone())
        return sampled, rows

    engine.runner.run = recording_run
    tokens: dict[str, list[int]] = defaultdict(list)
    groups = [reqs] if together else [[r] for r in reqs]
    try:
        for group in groups:
            for request_id, ids, params in group:
                engine.add_request(request_id, ids, params)
            while engine.has_unfinished():
                for out in engine.step():
                    tokens[out.request_id] += out.new_token_ids
    finally:
        engine.runner.run = real_run
    return dict(tokens), dict(logits)


def assert_same(a, b, what: str) -> None:
    tokens_a, logits_a = a
    tokens_b, logits_b = b
    assert tokens_a.keys() == tokens_b.keys()
    differ = [rid for rid in tokens_a if tokens_a[rid] != tokens_b[rid]]
    assert not differ, f"{what}: {len(differ)} of {len(tokens_a)} requests changed tokens: {differ}"
    for rid in logits_a:
        assert len(logits_a[rid]) == len(logits_b[rid])
        for step, (x, y) in enumerate(zip(logits_a[rid], logits_b[rid], strict=True)):
            assert torch.equal(x, y), (
                f"{what}: {rid} step {step}: max diff {(x.float() - y.float()).abs().max()}"
            )


@pytest.fixture(scope="module", params=["dense", "moe"])
def checkpoint(request, tmp_path_factory):
    return make_hf_checkpoint(
        tmp_path_factory.mktemp(request.param), moe=request.param == "moe", vocab_size=4096,
        max_position_embeddings=1024,
    )  # fmt: skip


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_logits_do_not_depend_on_the_batch(checkpoint, dtype, path, monkeypatch):
    if path == "kernels" and not kernels.kernels_available():
        pytest.skip("qwen3's CPU kernels are not built here")
    if path == "torch":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    backend = "KernelAttention" if path == "kernels" else "TorchAttention"

    def make(**kwargs) -> LLM:
        kwargs.setdefault("kv_cache_memory", "64MiB")
        llm = LLM(str(checkpoint), dtype=dtype, skip_tokenizer_init=True, progress=False,
                  batch_invariant=path == "torch", **kwargs)  # fmt: skip
        assert type(llm.engine.runner.backend).__name__ == backend
        return llm

    reqs = requests(4096)
    alone = run(make(enable_prefix_caching=False, max_num_batched_tokens=4096), reqs, together=False)
    assert_same(alone, run(make(), reqs), "one batch of 40")
    assert_same(alone, run(make(max_num_batched_tokens=7), reqs), "7-token prefill chunks")
    cached = make()
    run(cached, reqs)
    hits = run(cached, reqs)
    assert cached.engine.blocks.hit_rate > 0.4
    assert_same(alone, hits, "prefix-cache hits")
    # 14 blocks of 32 tokens: the 40 requests (up to 352 tokens each) keep evicting each other
    small = make(kv_cache_memory=_bytes_for_blocks(checkpoint, dtype, 14, 32), block_size=32, max_num_seqs=8)
    preempted = run(small, reqs)
    assert small.engine.scheduler.num_preemptions > 0
    assert_same(alone, preempted, "preemption")


def _bytes_for_blocks(folder, dtype: str, blocks: int, block_size: int) -> int:
    from qwen3.checkpoint import load_config
    from qwen3.config import parse_dtype
    from qwen3.engine.memory import kv_bytes_per_token

    return blocks * block_size * kv_bytes_per_token(load_config(folder), parse_dtype(dtype))
