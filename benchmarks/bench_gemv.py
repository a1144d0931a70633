"""Decode-step linear layers of Qwen3-0.6B on CPU: F.linear bf16 vs our packed kernel vs the read roofline.

One "token" runs every linear layer of Qwen3-0.6B once (28 layers x q/k/v/o/gate/up/down plus the
151,936 x 1,024 lm_head: 1.19 GB of bf16 weights, read once) on M rows of activations. Reported per
method: median ms per token over the repeats, effective GB/s (weight bytes / time), the ratio to
F.linear and the fraction of the memory-read roofline measured in the same run.

Memory bandwidth on the shared machines is noisy and bimodal, so the methods are interleaved
round-robin within each repeat rather than run one after the other, and only numbers from the same
run should be compared.

    python benchmarks/bench_gemv.py                 # M = 1, 2, 4, 8
    python benchmarks/bench_gemv.py --rows 1 --repeats 15
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwen3 import kernels

logger = logging.getLogger("bench_gemv")

ROOF_SUM = "read roofline: torch.sum"
ROOF_LOOP = "read roofline: AVX read loop"

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 1024, 3072, 28, 151936
Q_OUT, KV_OUT = 2048, 1024  # 16 query heads, 8 kv heads, head_dim 128

# (name, out_features, in_features) of one decoder layer's linear layers, in execution order.
LAYER_SHAPES = [
    ("q", Q_OUT, HIDDEN),
    ("k", KV_OUT, HIDDEN),
    ("v", KV_OUT, HIDDEN),
    ("o", HIDDEN, Q_OUT),
    ("gate", INTERMEDIATE, HIDDEN),
    ("up", INTERMEDIATE, HIDDEN),
    ("down", HIDDEN, INTERMEDIATE),
]


def make_weights(seed: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in tqdm(range(LAYERS), desc="weights", leave=False):
        layers.append(
            {name: (torch.randn(n, k, generator=g) * 0.02).bfloat16() for name, n, k in LAYER_SHAPES}
        )
    lm_head = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16)
    for i in range(0, VOCAB, 16384):  # in slices, to avoid a 600 MB float32 temporary
        lm_head[i : i + 16384] = (torch.randn(min(16384, VOCAB - i), HIDDEN, generator=g) * 0.02).bfloat16()
    return layers, lm_head


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="M values (rows of x)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per method and M (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--read-gb", type=float, default=1.0, help="size of the roofline read buffer, GB")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused qkv + gate/up variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        logger.warning("load average %.1f: other processes are running, the numbers will be noisy", load1)
    have_kernel = kernels.kernels_available()
    logger.info(
        "torch %s, %d threads, kernel: %s", torch.__version__, torch.get_num_threads(), kernels.kernel_isa()
    )
    layers, lm_head = make_weights(0)
    weight_bytes = sum(w.numel() * 2 for layer in layers for w in layer.values()) + lm_head.numel() * 2
    logger.info("weights: %.3f GB of bf16", weight_bytes / 1e9)

    packed_layers = [
        {name: kernels.pack_linear_weight(w) for name, w in layer.items()}
        for layer in tqdm(layers, desc="pack", leave=False)
    ]
    packed_head = kernels.pack_linear_weight(lm_head)
    fused_layers = []
    if not args.no_fused:
        for layer in tqdm(layers, desc="pack fused", leave=False):
            fused_layers.append(
                {
                    "qkv": kernels.pack_linear_weight(torch.cat([layer["q"], layer["k"], layer["v"]])),
                    "o": kernels.pack_linear_weight(layer["o"]),
                    "gate_up": kernels.pack_gate_up_weight(layer["gate"], layer["up"]),
                    "down": kernels.pack_linear_weight(layer["down"]),
                }
            )

    read_buf = torch.ones(int(args.read_gb * 1e9) // 2, dtype=torch.bfloat16)
    read_bytes = read_buf.numel() * 2

    results: dict[tuple[str, int], tuple[float, float]] = {}  # (method, M) -> (median s, best s)
    for m in args.rows:
        xs = {k: torch.randn(m, k).bfloat16() for k in (HIDDEN, Q_OUT, INTERMEDIATE)}

        def torch_token(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer in layers:
                for w in layer.values():
                    F.linear(xs[w.shape[1]], w)
            F.linear(xs[HIDDEN], lm_head)

        def packed_token(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer in packed_layers:
                for p in layer.values():
                    kernels.packed_linear(xs[p.in_features], p)
            kernels.packed_linear(xs[HIDDEN], packed_head)

        xs32 = {k: x.float() for k, x in xs.items()}

        def packed_fp32_token(xs: dict[int, torch.Tensor] = xs32) -> None:
            packed_token(xs)

        def fused_token(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer in fused_layers:
                kernels.packed_linear(xs[HIDDEN], layer["qkv"])
                kernels.packed_linear(xs[Q_OUT], layer["o"])
                kernels.packed_gate_up_silu(xs[HIDDEN], layer["gate_up"])
                kernels.packed_linear(xs[INTERMEDIATE], layer["down"])
            kernels.packed_linear(xs[HIDDEN], packed_head)

        methods: dict[str, Callable[[], object]] = {"F.linear bf16": torch_token}
        if have_kernel:
            methods["packed kernel"] = packed_token
            methods["packed kernel, fp32 x"] = packed_fp32_token
            if fused_layers:
                methods["packed, fused qkv + gate/up"] = fused_token
        # The roofline is measured in every phase, interleaved with the rest, as the bandwidth drifts.
        methods[ROOF_SUM] = lambda: read_buf.sum()
        if have_kernel:
            methods[ROOF_LOOP] = lambda: torch.ops.qwen3_kernels.read_bandwidth_probe(read_buf)

        times: dict[str, list[float]] = {name: [] for name in methods}
        for rep in tqdm(range(args.warmup + args.repeats), desc=f"M={m}", leave=False):
            for name, fn in methods.items():  # round-robin: every method sees the same bandwidth mode
                t = time_once(fn)
                if rep >= args.warmup:
                    times[name].append(t)
        for name, ts in times.items():
            results[(name, m)] = (statistics.median(ts), min(ts))

    print()
    print(
        f"Qwen3-0.6B decode linears: {weight_bytes / 1e9:.3f} GB bf16, {torch.get_num_threads()} threads, "
        f"kernel path {kernels.kernel_isa()}; median (and best) of {args.repeats}. Roofline = the faster "
        f"read of a {read_bytes / 1e9:.2f} GB bf16 buffer in the same phase (same M)."
    )
    print()
    print("| method | M | ms per token | best ms | effective GB/s | vs F.linear | % of roofline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in args.rows:
        roof = {n: read_bytes / results[(n, m)][0] / 1e9 for n in (ROOF_SUM, ROOF_LOOP) if (n, m) in results}
        roof_gbs = max(roof.values())
        base = results[("F.linear bf16", m)][0]
        for (name, mm), (t, best) in results.items():
            if mm != m or name in roof:
                continue
            gbs = weight_bytes / t / 1e9
            print(
                f"| {name} | {m} | {1e3 * t:.1f} | {1e3 * best:.1f} | {gbs:.1f} | {base / t:.2f}x "
                f"| {100 * gbs / roof_gbs:.0f}% |"
            )
        for name, gbs in roof.items():
            print(f"| {name} | {m} | | | {gbs:.1f} | | {100 * gbs / roof_gbs:.0f}% |")


if __name__ == "__main__":
    main()
