"""The ``qwen3`` command line: one subcommand per job, each with its own ``--help``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("qwen3")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        help="checkpoint folder, Hugging Face Hub repo id, GGUF file, or owner/repo:FILE.gguf "
        "(default: the shipped tiny Qwen3)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights and activations dtype (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: cuda if present)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or Hub repo id (default: the model's own)"
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (prompt + output) to serve (default: the checkpoint's, lowered with a "
        "warning to what the KV cache holds)",
    )
    parser.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV-cache size, e.g. 8GiB (default: --kv-cache-fraction of the memory free after the weights)",
    )
    parser.add_argument(
        "--kv-cache-fraction",
        type=float,
        default=None,
        help="share of the free memory the KV cache takes: of the available RAM on CPU (default 0.5), "
        "of the GPU's total on CUDA (default 0.9, vLLM's gpu_memory_utilization)",
    )
    parser.add_argument(
        "--attention-backend",
        choices=["kernel", "torch"],
        default=None,
        help="attention over the paged cache: qwen3's CPU kernel or torch SDPA (default: the kernel where it runs)",
    )
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="results independent of the batch on the torch path too (CUDA; slower). The CPU kernels "
        "always are",
    )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling (default: the checkpoint's generation_config / Qwen3's advice)"
    )
    group.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--presence-penalty", type=float, default=None, help="0-2; against endless repetition")
    group.add_argument("--max-tokens", type=int, default=None, help="cap on generated tokens")
    group.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def cmd_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's architecture and size without loading its weights."""
    from qwen3.checkpoint import load_config, weight_files
    from qwen3.gguf_checkpoint import GGUFCheckpoint, is_gguf, resolve_gguf
    from qwen3.hub import resolve_model_dir

    if is_gguf(args.model):
        checkpoint = GGUFCheckpoint(resolve_gguf(args.model))
        folder, config, files = checkpoint.path, checkpoint.config(), [checkpoint.path]
        config.torch_dtype = None
        kinds = sorted({t.type.name for t in checkpoint.tensors})
    else:
        folder = resolve_model_dir(args.model)
        config = load_config(folder)
        files = weight_files(folder)
        kinds = [str(config.torch_dtype).removeprefix("torch.")]
    info = {
        "folder": str(folder),
        "architecture": config.architecture,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads (q/kv)": f"{config.num_attention_heads}/{config.num_key_value_heads}",
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "dtype": ", ".join(kinds),
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


def _load_llm(args: argparse.Namespace):
    from qwen3.llm import LLM

    return LLM(args.model, **_engine_options(args))


def _engine_options(args: argparse.Namespace) -> dict:
    """The LLM keyword arguments the shared model options (_add_model_args) set."""
    return dict(
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_fraction=args.kv_cache_fraction,
        attention_backend=args.attention_backend,
        batch_invariant=args.batch_invariant,
    )


def _sampling(args: argparse.Namespace, llm, **mode_defaults):
    overrides = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "presence_penalty": args.presence_penalty,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    return llm.default_sampling_params(
        **{**mode_defaults, **{k: v for k, v in overrides.items() if v is not None}}
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete a raw prompt (no chat template) and stream the text to stdout."""
    from qwen3.async_llm import AsyncLLM
    from qwen3.llm import ChatRequest

    llm = _load_llm(args)
    front = AsyncLLM(llm)
    params = _sampling(args, llm)
    request = ChatRequest(llm.tokenizer.encode(args.prompt), params, None, False)
    start, n = time.perf_counter(), 0
    try:
        for delta in front.stream_chat_sync(request):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            n += len(delta.token_ids)
    finally:
        front.shutdown()
    print()
    logger.info(
        "%d tokens in %.2f s (%.1f tokens/s)",
        n,
        time.perf_counter() - start,
        n / (time.perf_counter() - start),
    )
    return 0


DIM, RESET = "\033[2m", "\033[0m"
CHAT_HELP = """commands: /think and /no_think (alone: switch mode; inside a message: Qwen3's soft switch),
/budget N (cap thinking at N tokens; /budget off), /reset (forget the conversation), /help, /exit"""


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a model: streams the answer, shows thinking dimmed, keeps the conversation."""
    from qwen3.async_llm import AsyncLLM

    llm = _load_llm(args)
    front = AsyncLLM(llm)
    history: list[dict[str, str]] = []
    thinking, budget = not args.no_think, args.thinking_budget
    color = sys.stdout.isatty()
    try:
        if args.prompt:
            _chat_turn(front, args, history, args.prompt, thinking, budget, color)
            return 0
        print(
            f"qwen3 chat: {llm.model_dir}  ({'thinking' if thinking else 'non-thinking'} mode)\n{CHAT_HELP}"
        )
        while True:
            try:
                line = input("\n> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/help":
                print(CHAT_HELP)
            elif line == "/reset":
                history.clear()
                print("(conversation cleared)")
            elif line in ("/think", "/no_think"):
                thinking = line == "/think"
                print(f"({'thinking' if thinking else 'non-thinking'} mode)")
            elif line.startswith("/budget"):
                value = line.removeprefix("/budget").strip()
                budget = None if value in ("", "off") else int(value) if value.isdigit() else budget
                print(f"(thinking budget: {budget if budget is not None else 'off'})")
            else:
                _chat_turn(front, args, history, line, thinking, budget, color)
    finally:
        front.shutdown()


def _chat_turn(front, args, history, text, thinking, budget, color) -> None:
    from qwen3.sampling import RECOMMENDED

    history.append({"role": "user", "content": text})
    llm = front.llm
    params = _sampling(args, llm, **RECOMMENDED[thinking and budget != 0])
    # Re-rendered from the whole history every turn: Qwen3's template drops earlier turns' thinking.
    request = llm.prepare_chat(history, params, enable_thinking=thinking, thinking_budget=budget)
    start, n, answer, in_reasoning = time.perf_counter(), 0, [], False
    try:
        for delta in front.stream_chat_sync(request):
            n += len(delta.token_ids)
            if delta.reasoning:
                if not in_reasoning and color:
                    sys.stdout.write(DIM)
                in_reasoning = True
                sys.stdout.write(delta.reasoning)
            if delta.content or delta.tool_calls:
                if in_reasoning:
                    sys.stdout.write((RESET if color else "") + "\n\n")
                    in_reasoning = False
                sys.stdout.write(delta.content)
                answer.append(delta.content)
                for call in delta.tool_calls:
                    sys.stdout.write(f"\n[tool call] {call.name}({call.arguments})")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass  # leaving the stream aborts the request and frees its cache
    if in_reasoning and color:
        sys.stdout.write(RESET)
    elapsed = time.perf_counter() - start
    history.append({"role": "assistant", "content": "".join(answer)})
    sys.stdout.write(
        f"\n{DIM if color else ''}[{n} tokens, {n / elapsed:.1f} tokens/s]{RESET if color else ''}\n"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure qwen3 against transformers (and llama.cpp when it can be built) on one random checkpoint."""
    from qwen3.bench import format_report, run

    report = run(args)
    print(format_report(report))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (chat completions, responses, completions, models,
    tokenize, metrics)."""
    from qwen3.llm import LLM
    from qwen3.server import ServerConfig, serve

    llm = LLM(
        args.model, max_num_seqs=args.max_num_seqs, tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel, **_engine_options(args),
    )  # fmt: skip
    config = ServerConfig(
        served_model_names=args.served_model_name or [args.model or "qwen3-default"],
        api_key=args.api_key,
        max_queue=args.max_queue,
        chat_template=args.chat_template.read_text(encoding="utf-8") if args.chat_template else None,
        shutdown_timeout=args.shutdown_timeout,
        max_request_bytes=args.max_request_bytes,
        template_timeout=args.template_timeout,
        plain_text_messages=not args.trust_message_tokens,
        web_ui=not args.no_ui,
        allowed_origins=[o for arg in args.allowed_origins for o in arg.split(",") if o],
    )
    try:
        serve(llm, config, args.host, args.port)
    finally:
        llm.close()  # the tensor-parallel workers, if any, leave with the server
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write a checkpoint (safetensors folder, Hub id or GGUF) as a GGUF file llama.cpp and qwen3 load."""
    from qwen3.checkpoint import load_model
    from qwen3.gguf_checkpoint import GGUFCheckpoint, is_gguf, resolve_gguf, save_gguf
    from qwen3.hub import resolve_model_dir
    from qwen3.tokenizer import Tokenizer

    model = load_model(args.source, dtype="float32")
    if is_gguf(args.source):
        tokenizer = GGUFCheckpoint(resolve_gguf(args.source)).tokenizer()
    else:
        tokenizer = Tokenizer.from_pretrained(resolve_model_dir(args.source))
    path = save_gguf(model, tokenizer, args.output, args.type)
    logging.getLogger("qwen3").info("wrote %s (%s, %.1f MiB)", path, args.type, path.stat().st_size / 2**20)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the tiny hybrid-thinking Qwen3 on synthetic reasoning tasks and write a Hugging Face folder.
    --stage sft (default): the supervised recipe from scratch (cold start, Thinking Mode Fusion, general,
    agent, polish), resuming from OUTPUT/checkpoint when there is one; --stage grpo: reasoning RL from a
    checkpoint; --stage distill --teacher M: strong-to-weak distillation into a smaller student."""
    from qwen3.train.command import run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model (default: the shipped tiny Qwen3) on held-out reasoning problems: accuracy in
    thinking and non-thinking mode, accuracy against the thinking budget, /think and /no_think
    following, and tool use with the calculator; greedy decoding through the engine."""
    from qwen3.eval import run

    return run(args)


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

    generate = sub.add_parser("generate", help="complete a raw prompt", description=cmd_generate.__doc__)
    _add_model_args(generate)
    generate.add_argument("prompt", help="the prompt text (sent as is, no chat template)")
    _add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="chat interactively (or answer one prompt)",
        description=cmd_chat.__doc__,
        epilog=CHAT_HELP,
    )
    _add_model_args(chat)
    chat.add_argument(
        "prompt", nargs="?", help="answer this one message and exit instead of starting the REPL"
    )
    chat.add_argument("--no-think", action="store_true", help="non-thinking mode (enable_thinking=False)")
    chat.add_argument(
        "--thinking-budget",
        type=int,
        default=None,
        metavar="N",
        help="stop thinking after N tokens and answer (0 = non-thinking)",
    )
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser(
        "bench", help="benchmark qwen3 against transformers and llama.cpp", description=cmd_bench.__doc__
    )
    from qwen3.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", description=cmd_serve.__doc__
    )
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("QWEN3_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $QWEN3_API_KEY, else none)",
    )
    serve.add_argument(
        "--served-model-name", nargs="+", default=None, metavar="NAME",
        help="model name(s) clients use; the first appears in responses (default: the --model value)",
    )  # fmt: skip
    serve.add_argument(
        "--allowed-origins", nargs="+", default=["*"], metavar="ORIGIN",
        help="origins browsers may call from (CORS), e.g. http://localhost:3000; '*' allows any, without "
        "credentials; a list of origins allows credentials (default: *)",
    )  # fmt: skip
    serve.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch (default: 64)")
    serve.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
        help="split the model over N processes (one per GPU; gloo on CPU), this one rank 0 (default: 1). "
        "qwen3 spawns them, or, under torchrun (e.g. --nnodes 2 --nproc-per-node 1 --master-addr HOST), "
        "every machine runs this same command and rank 0 serves",
    )  # fmt: skip
    serve.add_argument(
        "--enable-expert-parallel", action="store_true",
        help="MoE models under tensor parallel: give each rank E/N whole experts instead of a 1/N slice of "
        "every expert",
    )  # fmt: skip
    serve.add_argument(
        "--max-queue", type=int, default=256,
        help="sequences that may wait beyond the batch; more get 503 (default: 256)",
    )  # fmt: skip
    serve.add_argument(
        "--chat-template", type=Path, default=None, metavar="FILE",
        help="jinja chat template to use instead of the checkpoint's",
    )  # fmt: skip
    serve.add_argument(
        "--shutdown-timeout", type=float, default=30.0, metavar="S",
        help="on SIGTERM, seconds in-flight requests get to finish; streams still running then end with "
        "finish_reason 'abort' and [DONE] (default: 30)",
    )  # fmt: skip
    serve.add_argument(
        "--no-ui", action="store_true", help="do not serve the web chat page at / (the API only)"
    )
    limits = serve.add_argument_group("limits (docs/design.md lists them all)")
    limits.add_argument(
        "--max-request-bytes", type=int, default=2 * 2**20, metavar="N",
        help="request bodies larger than this get 413 (default: 2 MiB)",
    )  # fmt: skip
    limits.add_argument(
        "--template-timeout", type=float, default=5.0, metavar="S",
        help="seconds one chat template render may take before the request gets 400 (default: 5)",
    )  # fmt: skip
    limits.add_argument(
        "--trust-message-tokens", action="store_true",
        help="tokenize message text as transformers does, so text such as '<|im_start|>' becomes control "
        "tokens (default: off: message text is always plain text and cannot forge turns)",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser(
        "train",
        help="train the tiny hybrid-thinking Qwen3 (the shipped default model)",
        description=cmd_train.__doc__,
        epilog="Data parallel: torchrun --nproc-per-node 2 -m qwen3 train --output DIR ...",
    )
    from qwen3.train.command import add_arguments as add_train_arguments

    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "eval",
        help="evaluate thinking, non-thinking, budgets, mode following and tool use",
        description=cmd_eval.__doc__,
    )
    from qwen3.eval import add_arguments as add_eval_arguments

    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    from qwen3.gguf_checkpoint import QUANT_TYPES

    quantize = sub.add_parser(
        "quantize",
        help="write a checkpoint as a GGUF file (Q8_0, Q4_0, ...)",
        description=cmd_quantize.__doc__,
    )
    quantize.add_argument("source", help="checkpoint folder, Hub repo id or GGUF file")
    quantize.add_argument("output", type=Path, help="the .gguf file to write")
    quantize.add_argument(
        "--type", default="q8_0", choices=sorted(QUANT_TYPES),
        help="matrix type; norms stay F32, embeddings of 4- and 5-bit files Q8_0 (default: q8_0)",
    )  # fmt: skip
    quantize.set_defaults(func=cmd_quantize)

    info = sub.add_parser("info", help="show a checkpoint's architecture", description=cmd_info.__doc__)
    info.add_argument(
        "--model",
        "-m",
        required=True,
        help="checkpoint folder, Hub repo id, GGUF file or owner/repo:FILE.gguf",
    )
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
    from qwen3.async_llm import EngineDeadError
    from qwen3.checkpoint import CheckpointError
    from qwen3.config import ConfigError
    from qwen3.distributed import ParallelError
    from qwen3.engine.llm_engine import RequestError
    from qwen3.engine.memory import KVCacheError
    from qwen3.hub import ModelNotFoundError

    try:
        return args.func(args)
    except (
        CheckpointError,
        ConfigError,
        KVCacheError,
        ModelNotFoundError,
        RequestError,
        FileNotFoundError,
    ) as exc:
        logger.error("%s", exc)
        return 2
    except (EngineDeadError, ParallelError) as exc:  # a rank died: the server went down, loudly
        logger.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
