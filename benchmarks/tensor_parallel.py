"""Tensor parallel on one machine: decode (batch 1) and batch-32 tokens/s, TP=1 against TP=2, in one run,
plus a model of the scale-out from the measured single-process step time.

The model is a random-weight checkpoint of the Qwen3-0.6B shape cut to ``--layers`` decoder layers. TP=1
runs with all the machine's threads; TP=2 gives each rank half of them (rank 0 here, the worker in
``qwen3.distributed``), so both runs use the same cores. On a 2-core CPU over gloo TP=2 cannot be faster:
the same FLOPs and bytes are split over the same two cores, and every layer adds two all-reduces through
loopback TCP. What the run is for: proof that the path works end to end at a real shape, what the
all-reduces cost on this machine, and the inputs of the scale-out model.

The scale-out model (printed, and written into docs/benchmarks.md by hand): per layer, o_proj and
down_proj each all-reduce a [tokens, hidden] activation, 2 x hidden x dtype bytes per token; one more
for the vocab-parallel embedding; the lm_head all-gathers vocab/N logits per rank and token. A ring
all-reduce of S bytes over N ranks costs 2(N-1) latency hops and 2(N-1)/N x S / bandwidth; the compute of a
step is taken as the measured single-process step time / N (ideal split, memory-bound decode).

    python benchmarks/tensor_parallel.py                  # 4 layers, bf16, ~2 minutes on 2 cores
    python benchmarks/tensor_parallel.py --model Qwen3-30B-A3B --layers 2    # MoE: + expert parallel
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from qwen3 import LLM, SamplingParams
from qwen3.bench import CACHE, cpu_model, random_checkpoint, real_config
from qwen3.distributed import parameter_bytes

logger = logging.getLogger("tensor_parallel")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Links of the model: (name, bandwidth bytes/s per direction, latency s per ring hop). Assumed, not measured:
# NVLink 4 (H100) ~450 GB/s, NCCL's small-message hop a few us; TCP over 10/100 GbE ~25/10 us a hop.
LINKS = [("NVLink ~450 GB/s", 450e9, 3e-6), ("100 GbE", 12.5e9, 10e-6), ("10 GbE", 1.25e9, 25e-6)]


def measure(
    folder: Path, size: int, args: argparse.Namespace, expert_parallel: bool = False
) -> dict[str, float]:
    """Decode and batch-32 tokens/s of one LLM with ``size`` ranks (greedy, EOS ignored)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))  # rank 0's share; the workers take theirs
    llm = LLM(
        folder, dtype=args.dtype, skip_tokenizer_init=True, kv_cache_memory="512MiB", max_model_len=512,
        max_num_seqs=args.batch, progress=False, tensor_parallel_size=size,
        enable_expert_parallel=expert_parallel,
    )  # fmt: skip
    try:
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        prompt = list(range(1000, 1016))
        llm.generate([prompt], greedy.replace(max_tokens=4))  # warm-up: kernels, allocator, the gloo pairs

        def timed(prompts: list[list[int]], tokens: int) -> float:
            start = time.perf_counter()
            llm.generate(prompts, greedy.replace(max_tokens=tokens))
            return time.perf_counter() - start

        first = timed([prompt], 1)  # the prefill and first token, subtracted: pure decode
        decode = timed([prompt], args.decode_tokens)
        batch = [list(range(2000 + i, 2000 + i + 16)) for i in range(args.batch)]
        batched = timed(batch, args.batch_tokens)
        result = {
            "decode_tok_s": (args.decode_tokens - 1) / (decode - first),
            "decode_step_ms": 1e3 * (decode - first) / (args.decode_tokens - 1),
            f"batch{args.batch}_tok_s": args.batch * args.batch_tokens / batched,
            f"batch{args.batch}_step_ms": 1e3 * batched / args.batch_tokens,
        }
        own = [parameter_bytes(llm.model)]
        result["weight_bytes_per_rank"] = llm.workers.parameter_bytes(llm.model) if llm.workers else own
        return result
    finally:
        llm.close()


def traffic(config: dict[str, Any], dtype_bytes: int, layers: int) -> dict[str, float]:
    """Collectives of one decode step per token, from the config: counts and bytes."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    return {
        "all_reduces_per_layer": 2,  # o_proj, down_proj
        "all_reduces_per_step": 2 * layers + 1,  # + the vocab-parallel embedding
        "all_reduce_bytes_per_token_per_layer": 2 * hidden * dtype_bytes,
        "all_reduce_bytes_per_token": (2 * layers + 1) * hidden * dtype_bytes,
        "logits_bytes_per_token": vocab * dtype_bytes,  # all-gathered in the model's dtype, (N-1)/N received
    }


def scale_out(
    step_s: float, tokens: int, config: dict[str, Any], dtype_bytes: int, layers: int
) -> list[dict]:
    """Modelled step time and speed-up at 2/4/8 ranks over each link, from a measured single-process step."""
    t = traffic(config, dtype_bytes, layers)
    rows = []
    for n in (2, 4, 8):
        for name, bandwidth, hop in LINKS:
            size = t["all_reduce_bytes_per_token"] / t["all_reduces_per_step"] * tokens  # one all-reduce
            one = 2 * (n - 1) * hop + 2 * (n - 1) / n * size / bandwidth
            gather = (n - 1) * hop + (n - 1) / n * t["logits_bytes_per_token"] * tokens / bandwidth
            comm = t["all_reduces_per_step"] * one + gather
            step = step_s / n + comm
            rows.append({"ranks": n, "link": name, "comm_ms": 1e3 * comm, "step_ms": 1e3 * step,
                         "speedup": step_s / step})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="Qwen3-0.6B", help="a released config to cut down (e.g. Qwen3-30B-A3B: "
                        "MoE, measured with experts sliced and with expert parallel)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=32, help="tokens each batch request generates")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = real_config(args.model, layers=args.layers)
    dtype = DTYPES[args.dtype]
    name = f"{args.model.lower()}-{args.layers}layers-random-{args.dtype}"
    folder = random_checkpoint(CACHE / name, config, dtype)
    report: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                              "model": args.model, "layers": args.layers, "dtype": args.dtype}  # fmt: skip
    runs = [("tp1", 1, False), ("tp2", 2, False)]
    if config.get("num_experts"):
        runs.append(("tp2_expert_parallel", 2, True))
    for key, size, expert_parallel in runs:
        start = time.perf_counter()
        report[key] = measure(folder, size, args, expert_parallel)
        logger.info("%s (%.0f s): %s", key, time.perf_counter() - start, report[key])
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    report["traffic"] = traffic(config, dtype_bytes, args.layers)
    report["traffic_28_layers"] = traffic(config, dtype_bytes, 28)
    tp1 = report["tp1"]
    report["scale_out"] = {
        "decode": scale_out(tp1["decode_step_ms"] / 1e3, 1, config, dtype_bytes, args.layers),
        f"batch{args.batch}": scale_out(tp1[f"batch{args.batch}_step_ms"] / 1e3, args.batch, config,
                                        dtype_bytes, args.layers),
    }  # fmt: skip
    text = json.dumps(report, indent=2)
    logger.info("%s", text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
