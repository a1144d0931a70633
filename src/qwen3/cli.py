"""The ``qwen3`` command line: one subcommand per job, each with its own ``--help``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("qwen3")


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's architecture and size without loading its weights."""
    from qwen3.checkpoint import load_config, weight_files
    from qwen3.hub import resolve_model_dir

    folder = resolve_model_dir(args.model)
    config = load_config(folder)
    files = weight_files(folder)
    info = {
        "folder": str(folder),
        "architecture": config.architecture,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads (q/kv)": f"{config.num_attention_heads}/{config.num_key_value_heads}",
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "dtype": str(config.torch_dtype).removeprefix("torch."),
        "weight files": [f.name for f in files],
        "weight bytes": sum(f.stat().st_size for f in files),
    }
    if config.is_moe:
        info["experts"] = f"{config.num_experts_per_tok} of {config.num_experts}"
    print(json.dumps(info, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Create a random-initialised Qwen3 checkpoint, load it back and decode with the KV cache."""
    import torch

    from qwen3 import load_model, save_model
    from qwen3.config import Qwen3Config
    from qwen3.model import Qwen3ForCausalLM, greedy_generate

    config = Qwen3Config(
        vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
        tie_word_embeddings=True, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.output or tmp)
        model = Qwen3ForCausalLM(config)
        save_model(model, folder)
        logger.info("wrote a random Qwen3 checkpoint (%d parameters) to %s", _count(model), folder)
        loaded = load_model(folder, device=args.device)
        prompt = torch.randint(0, config.vocab_size, (1, 16))
        with torch.inference_mode():
            logits = loaded(prompt.to(args.device))
        start = time.perf_counter()
        out = greedy_generate(loaded, prompt.to(args.device), max_new_tokens=args.tokens)
        elapsed = time.perf_counter() - start
    print(f"forward pass: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")
    print(
        f"greedy continuation ({args.tokens} tokens, {args.tokens / elapsed:.0f} tokens/s): "
        f"{out[0, 16:].tolist()}"
    )
    print("This checkpoint has random weights: the ids are meaningless, the machinery is real.")
    return 0


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3",
        description="Run Qwen3 hybrid-reasoning language models (dense and MoE) from Python.",
        epilog="Run 'qwen3 COMMAND --help' for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="build a random Qwen3 checkpoint, load it and decode (no download needed)",
        description=cmd_demo.__doc__,
    )
    demo.add_argument("--tokens", type=int, default=32, help="tokens to decode (default: 32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    demo.add_argument("--output", help="keep the checkpoint in this folder instead of a temporary one")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="show a checkpoint's architecture", description=cmd_info.__doc__)
    info.add_argument("--model", "-m", required=True, help="checkpoint folder or Hugging Face Hub repo id")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from qwen3.checkpoint import CheckpointError
    from qwen3.hub import ModelNotFoundError

    try:
        return args.func(args)
    except (CheckpointError, ModelNotFoundError) as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
