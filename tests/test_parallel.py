"""Tensor-parallel serving (qwen3.distributed) on CPU over gloo, two processes: same greedy tokens as one
process, a shard of the weights and KV heads per rank, a dead worker reported rather than waited on."""

from __future__ import annotations

import os
import signal
import time

import pytest

from qwen3.distributed import ParallelError
from qwen3.llm import LLM
from qwen3.sampling import SamplingParams
from tests.reference import make_hf_checkpoint

PROMPTS = [[3, 17, 42, 99, 5, 250], [7, 7, 8], list(range(20, 60))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _llm(folder, size: int) -> LLM:
    return LLM(
        folder, skip_tokenizer_init=True, kv_cache_memory="8MiB", max_model_len=128,
        progress=False, tensor_parallel_size=size,
    )  # fmt: skip


def _weight_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.model.parameters())


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_tp2_greedy_matches_tp1_with_half_the_weights(tmp_path, kv_heads: int) -> None:
    # float32 checkpoint: the all-reduce sums partial products in another order than one matmul, so
    # logits differ by float rounding (~1e-7 relative); greedy ids over 12 tokens do not.
    folder = make_hf_checkpoint(tmp_path, num_key_value_heads=kv_heads)
    single = _llm(folder, 1)
    expected = [out.token_ids for out in single.generate(PROMPTS, GREEDY)]
    parallel = _llm(folder, 2)
    try:
        got = [out.token_ids for out in parallel.generate(PROMPTS, GREEDY)]
        assert got == expected
        assert parallel.engine.runner.pool.keys.shape[2] == max(kv_heads // 2, 1)  # only its KV heads
        ratio = _weight_bytes(parallel) / _weight_bytes(single)
        # norms are replicated (and, with one KV head, k/v projections too): a little over a half
        assert 0.5 <= ratio < (0.56 if kv_heads == 2 else 0.66), ratio
    finally:
        parallel.close()
    assert not any(p.is_alive() for p in parallel.workers.processes)


def test_dead_worker_is_reported_not_waited_on(tmp_path) -> None:
    folder = make_hf_checkpoint(tmp_path)
    llm = _llm(folder, 2)
    try:
        assert llm.generate([PROMPTS[0]], GREEDY)[0].token_ids  # it works first
        worker = llm.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        start = time.monotonic()
        with pytest.raises(ParallelError, match="rank 1"):
            llm.generate([PROMPTS[1]], GREEDY)
        assert time.monotonic() - start < 10
    finally:
        llm.close()
