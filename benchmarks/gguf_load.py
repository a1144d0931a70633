"""How GGUF files load in qwen3: open time, load time per dtype, and fidelity to the source checkpoint.

    python benchmarks/gguf_load.py --source CHECKPOINT_FOLDER FILE.gguf [FILE.gguf ...]

For each file: its tensor types, the time to parse it (``GGUFCheckpoint``), the time to ``load_model`` it in
float32 and bfloat16, and KL(source || file) and top-1 agreement of next-token distributions on random
tokens, the source checkpoint run in float32. docs/benchmarks.md has the figures and the files used.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from qwen3 import load_model
from qwen3.gguf_checkpoint import GGUFCheckpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="the Hugging Face folder the files were made from")
    parser.add_argument("files", nargs="+", help="GGUF files")
    parser.add_argument("--tokens", type=int, default=48, help="random tokens per row (2 rows)")
    args = parser.parse_args()
    source = load_model(args.source, dtype="float32", progress=False)
    ids = torch.randint(
        0, source.config.vocab_size, (2, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        reference = source(ids).log_softmax(-1)
    print("| file | tensor types | open | load fp32 / bf16 | KL to the source | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|")
    for path in args.files:
        start = time.perf_counter()
        checkpoint = GGUFCheckpoint(path)
        opened = time.perf_counter() - start
        kinds = ", ".join(
            f"{k} {n}" for k, n in collections.Counter(t.type.name for t in checkpoint.tensors).items()
        )
        loads, kl, agreement = [], 0.0, 0.0
        for dtype in ("float32", "bfloat16"):
            start = time.perf_counter()
            model = load_model(path, dtype=dtype, progress=False)
            loads.append(time.perf_counter() - start)
            if dtype == "float32":
                with torch.no_grad():
                    logprobs = model(ids).float().log_softmax(-1)
                kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
                agreement = (reference.argmax(-1) == logprobs.argmax(-1)).float().mean().item()
            del model
        print(
            f"| {path} | {kinds} | {opened:.2f} s | {loads[0]:.1f} s / {loads[1]:.1f} s | {kl:.4f} | {agreement:.3f} |"
        )


if __name__ == "__main__":
    main()
