"""Tensor-parallel serving (qwen3.distributed) on CPU over gloo, two processes: same greedy tokens as one
process, a shard of the weights and KV heads per rank, a dead worker reported rather than waited on, and
``qwen3 serve --tensor-parallel-size 2`` answering as the one-process server does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from qwen3.distributed import ParallelError
from qwen3.llm import LLM
from qwen3.sampling import SamplingParams
from qwen3.server import ServerConfig
from tests.live_server import free_port, live_server, wait_healthy
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
        per_rank = parallel.workers.parameter_bytes(parallel.model)  # each rank counts its own
        assert len(per_rank) == 2 and per_rank[0] == _weight_bytes(parallel)
        whole = _weight_bytes(single)
        for rank, held in enumerate(per_rank):
            # norms are replicated (and, with one KV head, k/v projections too): a little over a half
            assert 0.5 <= held / whole < (0.56 if kv_heads == 2 else 0.66), (rank, held, whole)
        assert per_rank[1] == per_rank[0]  # same shard shapes on every rank
        # the command left the ranks in lockstep: they still generate as one process does
        assert [out.token_ids for out in parallel.generate(PROMPTS[:1], GREEDY)] == expected[:1]
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


def _spawned_workers(parent: int) -> list[int]:
    """Pids of ``parent``'s multiprocessing-spawned children (its TP ranks, not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):  # it exited meanwhile
            continue
        if ppid == parent and "spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _chat(base_url: str) -> tuple[str, int]:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
        )  # fmt: skip
    assert reply.choices[0].finish_reason == "length"
    return reply.choices[0].message.content, reply.usage.completion_tokens


def test_serve_tp2_answers_as_tp1_and_a_dead_rank_turns_health_503(tiny_checkpoint) -> None:
    """The command users run, two ranks: a greedy chat round trip equal to the one-process server's; then
    a worker killed while the server idles makes /health (and the next request) 503 within seconds."""
    single = LLM(str(tiny_checkpoint), kv_cache_memory="16MiB", max_model_len=256, progress=False)
    with live_server(single, ServerConfig(["tiny"])) as live:
        expected = _chat(live.base_url)
    assert expected[1] == 8 and expected[0]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "qwen3.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
        "--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", "16MiB",
        "--tensor-parallel-size", "2", "--no-ui",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(process, url, 120)
        assert _chat(url + "/v1") == expected
        (worker,) = _spawned_workers(process.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (health := httpx.get(url + "/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 after a rank died"
            time.sleep(0.1)
        assert health.status_code == 503 and health.json()["status"] == "engine stopped"
        refused = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=30,
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert "ParallelError" in output and "rank 1" in output, output[-3000:]  # loud: the log says why


def test_a_rank_dying_mid_stream_ends_the_stream_and_health(tiny_checkpoint) -> None:
    """A rank killed while a stream runs: the step's ParallelError stops the engine thread (no hang), the
    stream ends in-band with the error and [DONE], /health turns 503."""
    llm = LLM(str(tiny_checkpoint), kv_cache_memory="16MiB", max_model_len=512, progress=False,
              tensor_parallel_size=2)  # fmt: skip
    try:
        with live_server(llm, ServerConfig(["tiny"], web_ui=False)) as live:
            body = {
                "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480,
                "temperature": 0, "ignore_eos": True, "stream": True,
            }  # fmt: skip
            with httpx.stream("POST", live.base_url + "/chat/completions", json=body, timeout=30) as reply:
                lines = reply.iter_lines()
                assert next(line for line in lines if '"content":"' in line or '"reasoning' in line)
                os.kill(llm.workers.processes[0].pid, signal.SIGKILL)
                start = time.monotonic()
                rest = [line for line in lines if line]
            assert time.monotonic() - start < 15
            assert rest[-1] == "data: [DONE]" and "generation failed" in rest[-2] and "rank 1" in rest[-2]
            assert not live.state.front.is_alive()
            assert isinstance(live.state.front.error, ParallelError)
            assert httpx.get(live.url + "/health").status_code == 503
    finally:
        llm.close()
