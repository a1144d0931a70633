"""``qwen3 train``'s command line: one command, three stages (``--stage sft|grpo|distill``).

Every field of each stage's config dataclass is a flag; a field several stages share (``--seed``,
``--steps``, ``--lr``, ...) is one flag whose default is the chosen stage's. A flag that belongs to
another stage than the chosen one is an error, not silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from qwen3.train.distill import DistillConfig
from qwen3.train.grpo import GRPOConfig
from qwen3.train.trainer import TrainConfig

STAGES: dict[str, type] = {"sft": TrainConfig, "grpo": GRPOConfig, "distill": DistillConfig}

# flags outside the configs: (dest, stages it belongs to, add_argument's arguments)
EXTRA_FLAGS: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = (
    ("save_every", ("sft",), dict(type=int, help="checkpoint every N steps (default: 100)")),
    ("until", ("sft",), dict(type=int, metavar="STEP", help="stop after this step (checkpointed; resume later)")),
    ("no_resume", ("sft",), dict(action="store_true", help="start over even if a checkpoint exists")),
    ("extend", ("sft",), dict(action="store_true",
                              help="resume a finished or running run with a larger --steps (the schedule restarts)")),
    ("show_data", ("sft",), dict(type=int, metavar="N", help="print N stage-2 samples (learned tokens in [[ ]]) and exit")),
    ("model", ("grpo", "distill"), dict(metavar="M", help="grpo: the checkpoint to start from (default: the "
                                        "shipped model); distill: the student to start from (default: a fresh one)")),
    ("teacher", ("distill",), dict(metavar="M", help="the teacher checkpoint (folder or Hub id); required")),
)  # fmt: skip
SFT_DEFAULTS = {"save_every": 100, "until": None, "no_resume": False, "extend": False, "show_data": 0}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def owners() -> dict[str, tuple[str, ...]]:
    """Each flag's destination and the stages it belongs to."""
    out: dict[str, list[str]] = {}
    for stage, config in STAGES.items():
        for f in dataclasses.fields(config):
            out.setdefault(f.name, []).append(stage)
    for dest, stages, _ in EXTRA_FLAGS:
        out[dest] = list(stages)
    return {k: tuple(v) for k, v in out.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``qwen3 train`` options: the stage, where to write, every stage's config fields and extra flags."""
    parser.add_argument("--stage", choices=tuple(STAGES), default="sft",
                        help="sft: the supervised recipe from scratch (default); grpo: reasoning RL from a "
                        "checkpoint; distill: strong-to-weak distillation from --teacher")  # fmt: skip
    parser.add_argument(
        "--output", "-o", type=Path, required=True, help="folder for checkpoints and the model"
    )
    fields: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for stage, config in STAGES.items():
        defaults = config()
        for f in dataclasses.fields(config):
            fields.setdefault(f.name, []).append((stage, f, getattr(defaults, f.name)))
    for name, entries in fields.items():
        kinds = {type(default) for _, _, default in entries}
        if len(kinds) != 1:
            raise TypeError(f"stages disagree on the type of {name}: {kinds}")
        text = entries[0][1].metadata.get("help", "model size: config.json's " + name)
        shown = ", ".join(f"{stage}: {default}" for stage, _, default in entries)
        parser.add_argument(_flag(name), type=kinds.pop(), default=None, help=f"{text} (default: {shown})")
    for dest, stages, options in EXTRA_FLAGS:
        help_text = f"[{'/'.join(stages)}] {options['help']}"
        parser.add_argument(_flag(dest), dest=dest, default=None, **{**options, "help": help_text})
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.set_defaults(train_parser=parser)


def stage_config(args: argparse.Namespace) -> Any:
    """The chosen stage's config from the flags given (its defaults for the rest); a flag of another stage
    is a usage error."""
    parser: argparse.ArgumentParser = args.train_parser
    misplaced = [
        _flag(dest) for dest, stages in owners().items()
        if getattr(args, dest, None) is not None and args.stage not in stages
    ]  # fmt: skip
    if misplaced:
        parser.error(f"{', '.join(misplaced)}: not an option of --stage {args.stage}")
    if args.stage == "distill" and args.teacher is None:
        parser.error("--stage distill needs --teacher")
    config = STAGES[args.stage]
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(config) if getattr(args, f.name) is not None
    }
    try:
        return config(**given)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))


def run(args: argparse.Namespace) -> int:
    """``qwen3 train``: the chosen stage."""
    config = stage_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "sft":
        from qwen3.train import trainer

        for dest, default in SFT_DEFAULTS.items():
            if getattr(args, dest) is None:
                setattr(args, dest, default)
        return trainer.run(config, args)
    if args.stage == "grpo":
        from qwen3.train import grpo

        return grpo.run(config, args.model, args.output)
    from qwen3.train import distill

    return distill.run(config, args.teacher, args.model, args.output)
