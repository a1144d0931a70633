"""What structured outputs cost: 32 concurrent requests all constrained against none, in one run.

The same 32 chat requests (non-thinking mode, so every token is the grammar's) run alternately without and
with a JSON-schema constraint, ``--repeats`` times each, on one ``LLM``; the figure is generated tokens per
second, median of the repeats, and the ratio constrained/unconstrained. The model is a random-weight
checkpoint of a real Qwen3 shape (Qwen3-0.6B by default: its 151,936-entry vocabulary is what the masks
cover); random weights never close the schema's strings, so both runs generate exactly ``--tokens`` tokens
per request. Also measured: compiling a typical schema (distinct each time, so never from the cache), a
cache hit, and the mask fill per constrained row.

    python benchmarks/structured_outputs.py                       # Qwen3-0.6B shape, 28 layers
    python benchmarks/structured_outputs.py --model default       # the shipped tiny model (fast steps)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy
import torch

from qwen3 import LLM, SamplingParams, StructuredOutputs
from qwen3.bench import CACHE, cpu_model, random_checkpoint, real_config
from qwen3.kernels import cpu_flags, kernel_isa

logger = logging.getLogger("structured_outputs")

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genres": {
            "type": "array",
            "items": {"enum": ["drama", "comedy", "horror", "sci-fi"]},
            "maxItems": 3,
        },
        "cast": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
                "required": ["name", "role"],
            },
        },
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["title", "year", "genres", "cast"],
}


def throughput(llm: LLM, conversations: list, params: SamplingParams) -> float:
    """Generated tokens per second for the whole batch."""
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, enable_thinking=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / elapsed


def compile_times(llm: LLM, count: int) -> tuple[float, float]:
    """Median seconds to compile a fresh schema, and to fetch one from the cache."""
    backend = llm.engine.config.grammars
    fresh, cached = [], []
    for i in range(count):
        schema = json.loads(json.dumps(SCHEMA).replace('"title"', f'"title_{i}"'))
        constraint = StructuredOutputs(json=schema)
        start = time.perf_counter()
        backend.compile(constraint)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        backend.compile(constraint)
        cached.append(time.perf_counter() - start)
    return statistics.median(fresh), statistics.median(cached)


def mask_fill_time(llm: LLM, rows: int) -> float:
    """Median seconds to fill one row's mask at the start of the schema (the most constrained state)."""
    backend = llm.engine.config.grammars
    states = [backend.new_state(StructuredOutputs(json=SCHEMA), False, False) for _ in range(rows)]
    times = []
    for _ in range(20):
        start = time.perf_counter()
        backend.start_masks(states).result()
        times.append((time.perf_counter() - start) / rows)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="Qwen3-0.6B", help="a real config's name, or 'default'")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.model == "default":
        model = None
    else:
        tag = f"{args.model.lower()}{f'-{args.layers}l' if args.layers else ''}-random-bfloat16"
        model = random_checkpoint(CACHE / tag, real_config(args.model, args.layers), torch.bfloat16)
    llm = LLM(model, max_num_seqs=args.concurrency, kv_cache_memory="2GiB", progress=False)
    conversations = [
        [{"role": "user", "content": f"Describe film number {i} as JSON."}] for i in range(args.concurrency)
    ]
    # ignore_eos: random weights would otherwise stop on an eos at random; greedy, so both runs are fixed
    free = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    held = free.replace(structured_outputs=StructuredOutputs(json=SCHEMA))
    throughput(llm, conversations[:2], held)  # warm up: kernels, llguidance's tokenizer, the schema
    runs: dict[str, list[float]] = {"none": [], "all": []}
    for _ in range(args.repeats):
        runs["none"].append(throughput(llm, conversations, free))
        runs["all"].append(throughput(llm, conversations, held))
    none, held_rate = statistics.median(runs["none"]), statistics.median(runs["all"])
    fresh, cached = compile_times(llm, 20)
    fill = mask_fill_time(llm, args.concurrency)
    flags = cpu_flags()
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline"
    print(f"CPU: {cpu_model()} ({isa}; kernels: {kernel_isa()}), {torch.get_num_threads()} threads")
    print(
        f"model: {args.model}{f' ({args.layers} layers)' if args.layers else ''}, "
        f"vocab {llm.model.config.vocab_size}"
    )
    print(f"{args.concurrency} concurrent x {args.tokens} tokens, median of {args.repeats}:")
    print(f"  none constrained: {none:8.1f} tok/s   runs {[round(r, 1) for r in runs['none']]}")
    print(f"  all constrained:  {held_rate:8.1f} tok/s   runs {[round(r, 1) for r in runs['all']]}")
    print(f"  ratio: {held_rate / none:.3f} ({(1 - held_rate / none) * 100:+.1f}% slower)")
    print(f"compile a typical schema: {fresh * 1e3:.2f} ms (cache hit {cached * 1e6:.0f} us)")
    where = (
        "on a worker thread, while the model runs"
        if llm.engine.config.grammars._pool
        else "inline: no spare core"
    )
    print(f"mask fill per constrained row: {fill * 1e6:.0f} us ({where})")
    numpy.testing.assert_array_less(0, [none, held_rate])


if __name__ == "__main__":
    main()
