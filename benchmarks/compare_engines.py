"""This engine against an earlier commit's, in one process, calls interleaved: before/after figures that the
machine's drifting memory bandwidth cannot fake.

Separate benchmark processes minutes apart can differ by 1.6x in batch-1 decode on the shared machines here
(the read bandwidth flips between two modes), so a change is judged by loading both engines side by side.
The old commit's ``src/qwen3`` is extracted with ``git archive`` into a temporary package ``qwen3old``
(imports and the ``qwen3_kernels`` op namespace renamed, so both kernel libraries load), both build an
``LLM`` on the same checkpoint, and the workloads alternate between them:

- decode: 64 new tokens after a 16-token prompt, minus that prompt's time (tokens/s);
- prefill: one 512-token prompt, prefix caching off (tokens/s);
- batch32 (``--batch32``): 32 requests of 128 prompt + 128 new tokens at once (new tokens/s).

    python benchmarks/compare_engines.py --ref d8a2577 --checkpoint ~/.cache/qwen3/bench/qwen3-0.6b-random-bfloat16
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("compare_engines")
REPO = Path(__file__).resolve().parents[1]


def extract_old(ref: str, into: Path) -> None:
    """``src/qwen3`` at ``ref`` as the package ``qwen3old`` under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "src/qwen3"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "qwen3old"
    (into / "src" / "qwen3").rename(package)
    for path in package.rglob("*"):
        if path.suffix not in (".py", ".cpp"):
            continue
        text = path.read_text(encoding="utf-8")
        for old, new in (
            ("qwen3_kernels", "qwen3old_kernels"),
            ("from qwen3.", "from qwen3old."),
            ("import qwen3.", "import qwen3old."),
            ("from qwen3 import", "from qwen3old import"),
            ('files("qwen3")', 'files("qwen3old")'),
        ):
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")


def engines(ref: str, checkpoint: str, tmp: Path):
    extract_old(ref, tmp)
    sys.path.insert(0, str(tmp))
    old_llm = importlib.import_module("qwen3old.llm")
    old_sampling = importlib.import_module("qwen3old.sampling")
    from qwen3.llm import LLM
    from qwen3.sampling import SamplingParams

    common = dict(max_model_len=4096, kv_cache_memory="2GiB", progress=False)
    return {
        "before": (old_llm.LLM(checkpoint, **common), old_sampling.SamplingParams),
        "after": (LLM(checkpoint, **common), SamplingParams),
    }


def decode(llm, params) -> float:
    greedy = params(temperature=0, ignore_eos=True)
    prompt = list(range(1000, 1016))
    start = time.perf_counter()
    llm.generate([prompt], greedy.replace(max_tokens=1))
    first = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate([prompt], greedy.replace(max_tokens=65))
    return 64 / (time.perf_counter() - start - first)


def prefill(llm, params) -> float:
    llm.engine.blocks.enable_prefix_caching = False
    prompt = [1000 + i % 50000 for i in range(512)]
    start = time.perf_counter()
    llm.generate([prompt], params(temperature=0, ignore_eos=True, max_tokens=1))
    llm.engine.blocks.enable_prefix_caching = True
    return 512 / (time.perf_counter() - start)


def batch32(llm, params) -> float:
    prompts = [list(range(2000 + i, 2128 + i)) for i in range(32)]
    start = time.perf_counter()
    llm.generate(prompts, params(temperature=0, ignore_eos=True, max_tokens=128))
    return 32 * 128 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", required=True, help="the earlier commit (anything git archive takes)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder both engines load")
    parser.add_argument("--rounds", type=int, default=6, help="alternations per workload (median)")
    parser.add_argument("--batch32", action="store_true", help="also the 32-request batch (slow)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workloads = {"decode": decode, "prefill": prefill} | ({"batch32": batch32} if args.batch32 else {})
    with tempfile.TemporaryDirectory() as tmp:
        pair = engines(args.ref, args.checkpoint, Path(tmp))
        for llm, params in pair.values():
            decode(llm, params)  # warm-up: kernels, allocator, KV blocks
        results: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for workload, fn in workloads.items():
                for name, (llm, params) in pair.items():
                    results.setdefault((workload, name), []).append(fn(llm, params))
            logger.info("round %d: %s", r + 1, {f"{w} {n}": round(v[-1], 1) for (w, n), v in results.items()})
    print(f"\n| tokens/s ({args.rounds} rounds, medians) | before ({args.ref}) | after | after / before |")
    print("|---|---:|---:|---:|")
    for workload in workloads:
        before = statistics.median(results[(workload, "before")])
        after = statistics.median(results[(workload, "after")])
        print(f"| {workload} | {before:.1f} | {after:.1f} | {after / before:.2f}x |")


if __name__ == "__main__":
    main()
