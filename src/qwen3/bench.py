"""``qwen3 bench``: qwen3 against transformers (and llama.cpp when available) in the same run.

Speed does not depend on the weights' values, so the benchmark builds a random-initialised checkpoint
with the real Qwen3-0.6B architecture and measures, on that same checkpoint:

- batch-1 decode tokens/s (``--decode-tokens`` new tokens after a short prompt),
- prefill tokens/s (one ``--prefill-tokens`` prompt, time to its first token),
- offline throughput: ``--requests`` requests with random prompt and output lengths (fixed seed),
- throughput at ``--concurrency`` requests of fixed length, the shape llama.cpp's batched bench runs,

and batch-1 decode as a fraction of the memory-bandwidth roofline: weight bytes read per token over
a read bandwidth measured in the same run. Every figure is a median of ``--repeats`` runs; ratios
compare runs made minutes apart on the same machine (bandwidth here is noisy, ~20%).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "qwen3" / "bench"
SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec"
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}  # fmt: skip  -- ../shared/spec/hf_qwen3_0.6b/config.json, so the bench runs without ../shared too


def random_checkpoint(folder: Path, config: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-initialised checkpoint (N(0, 0.02) weights) with a tokenizer, built once and cached."""
    from qwen3.checkpoint import save_model
    from qwen3.config import Qwen3Config
    from qwen3.model import model_class

    if (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    logger.info("building a random %s checkpoint in %s", config.get("model_type"), folder)
    cfg = Qwen3Config.from_dict(config)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    save_model(model.init_weights(seed=seed), folder)
    _add_tokenizer(folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False})
    )
    return folder


def real_config(name: str, layers: int | None = None) -> dict[str, Any]:
    """A released Qwen3's config.json (``../shared/spec/qwen3_configs.json``; Qwen3-0.6B is built in), with
    ``layers`` decoder layers if given (a cut-down model of the real shape)."""
    if name == "Qwen3-0.6B":
        config = dict(QWEN3_0_6B)
    else:
        path = SPEC / "qwen3_configs.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not there; only Qwen3-0.6B's config is built in")
        models = json.loads(path.read_text())["models"]
        if name not in models:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(models)}")
        config = dict(models[name]["config.json"])
    if layers:
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    return config


def random_gguf(name: str, quant: str, layers: int | None = None) -> Path:
    """A random-weight GGUF of model ``name`` in llama-quantize type ``quant``, made once and cached.

    Models under 3B parameters go the way users' files do: a random bf16 checkpoint, llama.cpp's converter,
    then ``llama-quantize``. Larger ones (Qwen3-30B-A3B is 61 GB in bf16) are written directly as random
    blocks in llama-quantize's per-tensor mix (:mod:`qwen3.gguf_random`), one tensor in memory at a time.
    """
    from qwen3.config import Qwen3Config
    from qwen3.gguf_random import write_random_gguf

    config = real_config(name, layers)
    tag = f"{name.lower()}{f'-{layers}l' if layers else ''}-random"
    cfg = Qwen3Config.from_dict(config)
    if cfg.num_parameters() < 3e9:
        folder = random_checkpoint(CACHE / f"{tag}-bfloat16", config, torch.bfloat16)
        return _llama_cpp_module().quantized_gguf(folder, quant)
    path = CACHE / f"{tag}-{quant}.gguf"
    if not path.is_file():
        from qwen3.tokenizer import Tokenizer

        folder = CACHE / f"{tag}-tokenizer"
        folder.mkdir(parents=True, exist_ok=True)
        _add_tokenizer(folder)
        logger.info("writing random %s %s blocks to %s", name, quant, path)
        write_random_gguf(cfg, Tokenizer.from_pretrained(folder), path, quant)
    return path


def _add_tokenizer(folder: Path) -> None:
    """The real Qwen3 vocabulary when ../shared/spec is beside the repo; else a small byte-level one.

    Token ids of a random model mean nothing, so a small tokenizer changes no timing that matters
    (prompts are given as ids; unknown ids decode to nothing).
    """
    if (SPEC / "tokenizer").is_dir():
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copyfile(SPEC / "tokenizer" / name, folder / name)
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ]
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["qwen3 benchmark tokenizer"], trainer)
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading a ``nbytes`` buffer once: the ceiling batch-1 decode can approach."""
    from qwen3 import kernels

    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    fn = (lambda: kernels.read_bandwidth_probe(buf)) if kernels.kernels_available() else (lambda: buf.sum())
    fn()
    return nbytes / median_time(fn, repeats)


def workload(n: int, low: int, high: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, output length) pairs with lengths uniform in [low, high]."""
    rng = random.Random(seed)
    return [([rng.randrange(1000, 100000) for _ in range(rng.randint(low, high))], rng.randint(low, high))
            for _ in range(n)]  # fmt: skip


# --- qwen3 --------------------------------------------------------------------------------------------


def bench_qwen3(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    from qwen3.llm import LLM
    from qwen3.sampling import SamplingParams

    llm = LLM(folder, dtype=args.dtype, max_model_len=4096, max_num_seqs=max(args.concurrency, 64),
              kv_cache_memory=args.kv_cache_memory, progress=False)  # fmt: skip
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    prompt = list(range(1000, 1016))
    decode_params = greedy.replace(max_tokens=args.decode_tokens)
    llm.generate([prompt], greedy.replace(max_tokens=8))  # warm-up: kernels, allocator

    def decode() -> None:
        llm.generate([prompt], decode_params)

    results: dict[str, float] = {}
    # Subtract the prompt's prefill so the figure is pure decode.
    first = median_time(lambda: llm.generate([prompt], greedy.replace(max_tokens=1)), args.repeats)
    results["decode_tok_s"] = (args.decode_tokens - 1) / (median_time(decode, args.repeats) - first)
    long_prompt = [1000 + i % 50000 for i in range(args.prefill_tokens)]
    llm.engine.blocks.enable_prefix_caching = False  # a prefill that hits the cache measures nothing
    prefill = median_time(lambda: llm.generate([long_prompt], greedy.replace(max_tokens=1)), args.repeats)
    results["prefill_tok_s"] = args.prefill_tokens / prefill
    if args.concurrency:
        fixed = [
            (list(range(2000 + i, 2000 + i + args.batch_prompt)), args.batch_output)
            for i in range(args.concurrency)
        ]
        results[f"batch{args.concurrency}_tok_s"] = _throughput(llm, fixed, greedy)
    if args.requests:
        jobs = workload(args.requests, args.min_len, args.max_len, args.seed)
        results["throughput_tok_s"] = _throughput(llm, jobs, greedy)
    llm.engine.blocks.enable_prefix_caching = True
    return results


def _throughput(llm, jobs: list[tuple[list[int], int]], greedy) -> float:
    """Generated tokens per second for all ``jobs`` submitted at once."""
    engine = llm.engine
    for i, (ids, n) in enumerate(jobs):
        engine.add_request(f"bench-{i}", ids, greedy.replace(max_tokens=n))
    total = sum(n for _, n in jobs)
    start = time.perf_counter()
    with tqdm(total=total, desc="qwen3 throughput", unit="tok", leave=False) as bar:
        while engine.has_unfinished():
            bar.update(sum(len(o.new_token_ids) for o in engine.step()))
    return total / (time.perf_counter() - start)


# --- transformers -------------------------------------------------------------------------------------


def bench_transformers(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    import transformers

    dtype = getattr(torch, args.dtype or "bfloat16")
    if folder.suffix == ".gguf":  # transformers dequantizes GGUF files at load too (gguf_file=)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder.parent, gguf_file=folder.name, dtype=dtype
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = model.eval()
    prompt = torch.arange(1000, 1016)[None]

    def gen(ids: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=151643)  # fmt: skip

    gen(prompt, 8)
    results: dict[str, float] = {}
    first = median_time(lambda: gen(prompt, 1), args.repeats)
    results["decode_tok_s"] = (args.decode_tokens - 1) / (median_time(lambda: gen(prompt, args.decode_tokens),
                                                                      args.repeats) - first)  # fmt: skip
    long_prompt = (torch.arange(args.prefill_tokens) % 50000 + 1000)[None]
    with torch.inference_mode():
        results["prefill_tok_s"] = args.prefill_tokens / median_time(lambda: model(long_prompt), args.repeats)
    if not args.concurrency:
        return results
    # Static batching (what transformers offers): a batch runs until its longest request is done.
    fixed = torch.stack(
        [torch.arange(2000 + i, 2000 + i + args.batch_prompt) for i in range(args.concurrency)]
    )
    start = time.perf_counter()
    gen(fixed, args.batch_output, torch.ones_like(fixed))
    results[f"batch{args.concurrency}_tok_s"] = (
        args.concurrency * args.batch_output / (time.perf_counter() - start)
    )
    if not args.requests:
        return results
    jobs = workload(args.requests, args.min_len, args.max_len, args.seed)
    total = sum(n for _, n in jobs)
    start = time.perf_counter()
    for i in tqdm(range(0, len(jobs), args.concurrency), desc="transformers throughput", leave=False):
        chunk = jobs[i : i + args.concurrency]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([[151643] * (width - len(p)) + p for p, _ in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        gen(ids, max(n for _, n in chunk), mask)
    results["throughput_tok_s"] = total / (time.perf_counter() - start)
    return results


# --- driver -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="weights dtype (default: bfloat16; a quantized GGUF stays quantized unless this is given)",
    )
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens for batch-1 decode")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="requests at once for the batch figure (0: skip it)"
    )
    parser.add_argument("--batch-prompt", type=int, default=128, help="prompt length in the batch figure")
    parser.add_argument("--batch-output", type=int, default=128, help="output length in the batch figure")
    parser.add_argument(
        "--requests", type=int, default=64, help="requests in the throughput workload (0: skip it)"
    )
    parser.add_argument("--min-len", type=int, default=100, help="shortest prompt/output in the workload")
    parser.add_argument("--max-len", type=int, default=1024, help="longest prompt/output in the workload")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--kv-cache-memory", default="8GiB", help="qwen3's KV-cache size")
    parser.add_argument(
        "--peers",
        default="transformers,llama.cpp",
        help="comma-separated peers to run beside qwen3 (transformers, llama.cpp, none)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="benchmark this checkpoint folder or GGUF file instead of a random Qwen3-0.6B (llama.cpp runs "
        "the same GGUF file)",
    )
    parser.add_argument(
        "--model-config",
        default="Qwen3-0.6B",
        help="the released Qwen3 whose config the random checkpoint has (Qwen3-8B, Qwen3-30B-A3B, ...)",
    )
    parser.add_argument("--layers", type=int, default=None, help="cut the random model to this many layers")
    parser.add_argument(
        "--quant",
        default=None,
        help="benchmark a random GGUF of this llama-quantize type (Q8_0, Q4_K_M, ...) instead: made with "
        "llama.cpp's converter and llama-quantize, or written as random blocks for models over 3B",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype or "bfloat16")
    folder = args.checkpoint
    if folder is None and args.quant:
        folder = random_gguf(args.model_config, args.quant, args.layers)
    elif folder is None:
        config = real_config(args.model_config, args.layers)
        tag = f"{args.model_config.lower()}{f'-{args.layers}l' if args.layers else ''}"
        folder = random_checkpoint(CACHE / f"{tag}-random-{args.dtype or 'bfloat16'}", config, dtype)
    from qwen3 import kernels
    from qwen3.checkpoint import load_config
    from qwen3.gguf_checkpoint import GGUFCheckpoint, is_gguf
    from qwen3.quantized import FORMATS

    weight_bytes = None
    weights = str(dtype).removeprefix("torch.")
    if is_gguf(folder):
        gguf = GGUFCheckpoint(folder)
        config = gguf.config()
        file_bytes = folder.stat().st_size
        quantized = sorted({t.type.name for t in gguf.tensors} & set(FORMATS))
        if quantized and args.dtype is None:  # run quantized: the blocks are what is read
            weight_bytes = gguf.decode_bytes()
            weights = "quantized " + "+".join(quantized)
    else:
        config = load_config(folder)
        file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    if weight_bytes is None:
        weight_bytes = config.decode_parameters() * dtype.itemsize  # a MoE step reads its active experts only

    report: dict[str, Any] = {
        "checkpoint": str(folder),
        "cpu": cpu_model(),
        "kernel_isa": kernels.kernel_isa(),
        "threads": torch.get_num_threads(),
        "dtype": weights,
        "torch": torch.__version__,
    }
    report["read_bandwidth_GBs"] = read_bandwidth() / 1e9
    report["weight_GB"] = weight_bytes / 1e9  # what qwen3 reads per batch-1 decode step
    report["file_GB"] = file_bytes / 1e9
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    report["qwen3"] = bench_qwen3(folder, args)
    report["qwen3_peak_rss_GB"] = _peak_rss(resource.RUSAGE_SELF)  # before any peer runs in this process
    if "transformers" in peers:
        report["transformers"] = bench_transformers(folder, args)
    if "llama.cpp" in peers:
        report["llama.cpp"] = bench_llama_cpp(folder, args)
        if report["llama.cpp"] and "peak_rss_GB" in report["llama.cpp"]:  # llama-bench's own peak
            report["llama_cpp_peak_rss_GB"] = report["llama.cpp"].pop("peak_rss_GB")
    roofline = report["read_bandwidth_GBs"] / report["weight_GB"]
    report["roofline_decode_tok_s"] = roofline
    report["qwen3_decode_fraction_of_roofline"] = report["qwen3"]["decode_tok_s"] / roofline
    return report


def _peak_rss(who: int) -> float:
    """Peak resident memory in GB of this process (``resource.RUSAGE_SELF``)."""
    return resource.getrusage(who).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def _llama_cpp_module() -> Any:
    """benchmarks/llama_cpp.py (beside the package in a clone): building, converting, running llama.cpp."""
    import importlib.util
    import sys

    if "qwen3_llama_cpp_bench" in sys.modules:
        return sys.modules["qwen3_llama_cpp_bench"]
    spec_path = Path(__file__).resolve().parents[2] / "benchmarks" / "llama_cpp.py"
    spec = importlib.util.spec_from_file_location("qwen3_llama_cpp_bench", spec_path)
    if spec is None or spec.loader is None or not spec_path.is_file():
        raise FileNotFoundError(spec_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["qwen3_llama_cpp_bench"] = module
    spec.loader.exec_module(module)
    return module


def bench_llama_cpp(folder: Path, args: argparse.Namespace) -> dict[str, float] | None:
    """llama.cpp's own benches on a GGUF of the same weights (see docs/benchmarks.md); None if unavailable."""
    try:
        return _llama_cpp_module().bench(folder, args)
    except Exception as exc:  # the peer is optional: say why it is missing and go on
        logger.warning("llama.cpp peer skipped: %s", exc)
        return None


def format_report(report: dict[str, Any]) -> str:
    keys = [k for k in report["qwen3"]]
    peers = [p for p in ("transformers", "llama.cpp") if report.get(p)]
    head = f"{'tokens/s':<22}{'qwen3':>10}" + "".join(f"{p:>14}{'ratio':>8}" for p in peers)
    machine = (
        f"{report.get('cpu') or 'CPU'}, {report['threads']} threads, kernels: {report.get('kernel_isa')}"
    )
    lines = [f"{report['dtype']} on {machine}", head, "-" * len(head)]
    for key in keys:
        ours = report["qwen3"][key]
        row = f"{key.removesuffix('_tok_s'):<22}{ours:>10.1f}"
        for p in peers:
            theirs = report[p].get(key)
            row += f"{theirs:>14.1f}{ours / theirs:>7.2f}x" if theirs else f"{'-':>14}{'-':>8}"
        lines.append(row)
    lines.append(
        f"read bandwidth {report['read_bandwidth_GBs']:.1f} GB/s, weights {report['weight_GB']:.2f} GB -> "
        f"roofline {report['roofline_decode_tok_s']:.1f} tok/s; qwen3 batch-1 decode at "
        f"{100 * report['qwen3_decode_fraction_of_roofline']:.0f}% of it"
    )
    if "qwen3_peak_rss_GB" in report:
        line = f"peak RSS: qwen3 {report['qwen3_peak_rss_GB']:.2f} GB"
        if "llama_cpp_peak_rss_GB" in report:
            line += f", llama.cpp {report['llama_cpp_peak_rss_GB']:.2f} GB"
        lines.append(line + f" (file {report['file_GB']:.2f} GB)")
    return "\n".join(lines)
