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
import torch

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
        # the same per-rank budget holds twice the tokens when each rank holds half the KV heads
        # (up to what max_num_seqs 64 x max_model_len 128 could ever fill: 512 blocks of 16)
        blocks, single_blocks = parallel.engine.config.num_blocks, single.engine.config.num_blocks
        wanted = (
            [min(2 * single_blocks + extra, 512) for extra in (0, 1)] if kv_heads == 2 else [single_blocks]
        )
        assert blocks in wanted and (kv_heads == 1 or single_blocks < 512), (blocks, single_blocks)
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


@pytest.fixture(scope="module")
def tp1_chat(tiny_checkpoint) -> tuple[str, int]:
    """The one-process server's greedy reply, which every tensor-parallel server must repeat."""
    single = LLM(str(tiny_checkpoint), kv_cache_memory="16MiB", max_model_len=256, progress=False)
    with live_server(single, ServerConfig(["tiny"])) as live:
        expected = _chat(live.base_url)
    assert expected[1] == 8 and expected[0]
    return expected


def _wait_unhealthy_then_exit(process: subprocess.Popen, url: str) -> str:
    """/health turns 503 (or the port closes) and the server exits on its own, non-zero: its output."""
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(url + "/health").status_code == 503:
                break
        except httpx.TransportError:  # already gone
            break
        assert time.monotonic() < deadline, "/health still 200 after a rank died"
        time.sleep(0.05)
    output = process.communicate(timeout=30)[0]  # it exits by itself: never a hang
    assert process.returncode not in (0, None), output[-3000:]
    return output


def test_serve_tp2_answers_as_tp1_and_exits_when_a_rank_dies(tiny_checkpoint, tp1_chat) -> None:
    """The command users run, two ranks: a greedy chat round trip equal to the one-process server's; then
    a worker killed while the server idles makes /health 503 and the server exit non-zero, saying why."""
    expected = tp1_chat

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
        output = _wait_unhealthy_then_exit(process, url)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert process.returncode == 1
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
            refused = httpx.post(
                live.base_url + "/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                timeout=30,
            )
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
    finally:
        llm.close()


# --- MoE: experts sliced (tensor parallel) or placed whole (expert parallel) ------------------------------


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-sliced", "expert-parallel"])
def test_moe_tp2_greedy_matches_tp1(tmp_path, expert_parallel: bool) -> None:
    folder = make_hf_checkpoint(tmp_path, moe=True, norm_topk_prob=True)
    single = _llm(folder, 1)
    expected = [out.token_ids for out in single.generate(PROMPTS, GREEDY)]
    parallel = LLM(
        folder, skip_tokenizer_init=True, kv_cache_memory="8MiB", max_model_len=128, progress=False,
        tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
    )  # fmt: skip
    try:
        assert [out.token_ids for out in parallel.generate(PROMPTS, GREEDY)] == expected
        experts = parallel.model.model.layers[0].mlp.experts
        if expert_parallel:  # 4 of the 8 experts, whole
            assert experts.num_experts == 4 and experts.intermediate_size == 48
        else:  # all 8, each its half of the intermediate size
            assert experts.num_experts == 8 and experts.intermediate_size == 24
        per_rank = parallel.workers.parameter_bytes(parallel.model)
        whole = _weight_bytes(single)
        for held in per_rank:  # the experts are most of it: a little over a half each
            assert 0.5 <= held / whole < 0.6, (per_rank, whole)
    finally:
        parallel.close()


def test_splits_that_do_not_divide_are_refused_up_front(tmp_path) -> None:
    moe = make_hf_checkpoint(tmp_path / "moe", moe=True, num_experts=6)
    with pytest.raises(ValueError, match="num_experts 6 does not divide"):
        LLM(moe, skip_tokenizer_init=True, tensor_parallel_size=4, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="moe_intermediate_size 48 does not divide.*enable-expert-parallel"):
        LLM(moe, skip_tokenizer_init=True, tensor_parallel_size=4 * 8)
    dense = make_hf_checkpoint(tmp_path / "dense")
    with pytest.raises(ValueError, match="expert parallel needs a MoE checkpoint"):
        LLM(dense, skip_tokenizer_init=True, tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="needs tensor_parallel_size > 1"):
        LLM(dense, skip_tokenizer_init=True, enable_expert_parallel=True)


# --- GGUF: each rank cuts its rows and blocks out of the mapped file ---------------------------------------


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-expert-parallel"])
def test_gguf_tp2_keeps_quantized_shards_and_matches_tp1(tmp_path, moe: bool) -> None:
    from qwen3.checkpoint import load_model
    from qwen3.gguf_checkpoint import save_gguf
    from qwen3.tokenizer import Tokenizer

    spec = Path(__file__).resolve().parents[2] / "shared" / "spec" / "tokenizer"
    if not spec.is_dir():
        pytest.skip("../shared/spec/tokenizer is absent")
    # Q8_0 blocks of 32: o_proj and down_proj cut their rows' blocks at 64 and 64 columns
    folder = make_hf_checkpoint(
        tmp_path / "hf", moe=moe, vocab_size=151936, num_hidden_layers=2, intermediate_size=128,
        norm_topk_prob=True,
    )  # fmt: skip
    path = save_gguf(
        load_model(folder, dtype="float32", progress=False), Tokenizer.from_pretrained(spec),
        tmp_path / "model.gguf", "q8_0", progress=False,
    )  # fmt: skip
    options = dict(kv_cache_memory="8MiB", max_model_len=128, progress=False)
    # The default load keeps the shards Q8_0 and runs bf16 activations: the all-reduce rounds partial sums
    # in bf16, so logprobs agree to bf16 precision (a random model over 151,936 ids has exact bf16 ties, so
    # greedy ids can part); dequantized to float32 from the same cut blocks, greedy ids are equal.
    first = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
    for dtype in (None, "float32"):
        single = LLM(path, dtype=dtype, **options)
        expected = single.generate(PROMPTS, GREEDY if dtype else first)
        parallel = LLM(path, dtype=dtype, tensor_parallel_size=2, enable_expert_parallel=moe, **options)
        try:
            got = parallel.generate(PROMPTS, GREEDY if dtype else first)
            attn = parallel.model.model.layers[0].self_attn
            assert attn.num_heads == 2 and parallel.model.lm_head.weight.shape[0] == 151936 // 2
            if dtype is None:
                assert attn.o_proj.quantized and attn.qkv_proj.quantized  # its shard, still Q8_0
                for one, two in zip(expected, got, strict=True):
                    assert one.token_ids == two.token_ids
                    assert abs(one.logprobs[0][0] - two.logprobs[0][0]) < 0.02
            else:
                assert [out.token_ids for out in got] == [out.token_ids for out in expected]
        finally:
            parallel.close()


def test_a_cut_inside_a_quantized_block_names_the_tensor(tmp_path) -> None:
    import gguf
    import numpy as np

    from qwen3.checkpoint import CheckpointError
    from qwen3.gguf_checkpoint import GGUFTensor, shard

    rows = GGUFTensor("blk.0.ffn_down.weight", gguf.GGMLQuantizationType.Q8_0, (4, 96),
                      np.zeros((4, 3 * 34), dtype=np.uint8))  # fmt: skip
    assert shard(rows, (slice(2, 4),), tmp_path).data.shape == (2, 102)  # rows: a view
    assert shard(rows, (slice(None), slice(32, 64)), tmp_path).shape == (4, 32)  # one block of each row
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_down.weight'.*Q8_0 blocks of 32.*starts at 48"):
        shard(rows, (slice(None), slice(48, 96)), tmp_path)


# --- the command channel: JSON and raw bytes, never pickle -------------------------------------------------


def test_step_commands_round_trip_without_pickle() -> None:
    from qwen3.distributed import decode_command, encode_command
    from qwen3.engine.attention import AttentionMetadata
    from qwen3.engine.model_runner import StepInputs

    meta = AttentionMetadata(
        slots=torch.tensor([5, 6, 7]), block_tables=torch.tensor([[0, 3]], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32), query_starts=torch.tensor([0, 3], dtype=torch.int32),
        host_seq_lens=[3], host_query_lens=[3],
    )  # fmt: skip
    step = StepInputs([(meta, torch.tensor([1, 2, 3]), torch.arange(3), 2)], [2])
    kind, back = decode_command(encode_command("step", step))
    assert kind == "step" and isinstance(back, StepInputs) and back.last_rows == [2]
    got, ids, positions, top = back.calls[0]
    assert isinstance(got, AttentionMetadata) and top == 2 and got.host_seq_lens == [3]
    for name in ("slots", "block_tables", "seq_lens", "query_starts"):
        assert torch.equal(getattr(got, name), getattr(meta, name))
        assert getattr(got, name).dtype == getattr(meta, name).dtype
    assert torch.equal(ids, step.calls[0][1]) and torch.equal(positions, torch.arange(3))
    options = {"num_blocks": 9, "attention_backend": None, "batch_invariant": False}
    assert decode_command(encode_command("runner", options)) == ("runner", options)

    with pytest.raises(TypeError, match="cannot carry set"):
        encode_command("step", {1, 2})
    forged = encode_command("step", {"x": torch.zeros(2)})
    text = bytes(forged[8:].tolist()).replace(b'"tensor": [0,', b'"tensor": [4096,')
    with pytest.raises(ParallelError, match="outside the command"):
        decode_command(torch.cat([forged[:8], torch.frombuffer(bytearray(text), dtype=torch.uint8)]))
    evil = b'{"kind": "step", "payload": {"dataclass": "Popen", "fields": {}}}'
    evil = torch.cat(
        [torch.tensor([len(evil)]).view(torch.uint8), torch.frombuffer(bytearray(evil), dtype=torch.uint8)]
    )
    with pytest.raises(ParallelError, match="malformed.*Popen"):
        decode_command(evil)


# --- launched by torchrun (or by hand with the env:// variables): nothing spawned -------------------------


def _env_rank(rank: int, master_port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}  # fmt: skip


def test_ranks_started_by_a_launcher_generate_as_one_process(tmp_path, monkeypatch) -> None:
    """This process is rank 0 (env:// variables as torchrun sets them), rank 1 another process running the
    same ``LLM(...)`` call: it serves rank 0's steps and exits 0 when rank 0 closes."""
    folder = make_hf_checkpoint(tmp_path)
    expected = [out.token_ids for out in _llm(folder, 1).generate(PROMPTS, GREEDY)]
    port = free_port()
    script = (
        "from qwen3.llm import LLM\n"
        f"LLM({str(folder)!r}, skip_tokenizer_init=True, kv_cache_memory='8MiB', max_model_len=128, "
        "progress=False, tensor_parallel_size=2)\n"
        "raise SystemExit(3)  # never reached: the constructor exits\n"
    )
    env = {**os.environ, **_env_rank(1, port), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for key, value in _env_rank(0, port).items():
        monkeypatch.setenv(key, value)
    try:
        llm = _llm(folder, 2)
        try:
            assert llm.workers.launched and not llm.workers.processes
            assert [out.token_ids for out in llm.generate(PROMPTS, GREEDY)] == expected
            assert len(llm.workers.parameter_bytes(llm.model)) == 2
        finally:
            llm.close()
        assert worker.wait(timeout=30) == 0, worker.communicate()[0]
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate(timeout=30)


def _children(parent: int, needle: str) -> list[int]:
    """Pids of ``parent``'s children whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):  # not a process, or it exited meanwhile
            continue
        if ppid == parent and needle in cmdline:
            found.append(int(entry.name))
    return found


def test_torchrun_two_nodes_serve_as_one_and_rank0_exits_when_the_other_node_dies(
    tiny_checkpoint, tp1_chat
) -> None:
    """Two torchrun agents (--nnodes 2 on one host, as on two machines) run the same ``qwen3 serve``: rank 0
    serves the one-process server's reply; killing rank 1 makes rank 0 exit non-zero, with the reason."""
    master, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [
        "--module", "qwen3.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
        "--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", "16MiB",
        "--tensor-parallel-size", "2", "--no-ui",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(master),
                *serve,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    try:
        wait_healthy(nodes[0], url, 180)
        assert _chat(url + "/v1") == tp1_chat
        (rank1,) = _children(nodes[1].pid, "qwen3.cli")
        os.kill(rank1, signal.SIGKILL)
        output = _wait_unhealthy_then_exit(nodes[0], url)
        assert "ParallelError" in output or "rank failed or left" in output, output[-3000:]
        nodes[1].communicate(timeout=60)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate(timeout=30)
