"""Turn a finished model folder into a ``qwen3 train`` checkpoint, so that more SFT can continue from it.

A shipped model's own run folder (with its AdamW moments) is not in the package; this writes
``OUTPUT/checkpoint`` from the weights and tokenizer of MODEL as the state of the default recipe at its
step ``--at`` (default 4,700, the end of stage 4), with fresh AdamW moments. Then
``qwen3 train --output OUTPUT --steps N --extend`` runs the steps from there to N, the cosine schedule
recomputed for N steps: stage 5's data (how the shipped model was made from the stage-4 one), or, with
the same ``--stage5-from`` beyond N here and in ``qwen3 train``, more of stage 4's (the compute-matched
SFT baseline of docs/tiny-model.md's GRPO section).

    git worktree add /tmp/stage4 9a018dc   # the stage-4 model shipped before stage 5
    .venv/bin/python scripts/sft_checkpoint.py /tmp/stage4/src/qwen3/default_model runs/ship
    .venv/bin/python scripts/sft_checkpoint.py src/qwen3/default_model runs/more --at 6200  # the shipped one
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file

from qwen3.checkpoint import load_model
from qwen3.tokenizer import Tokenizer
from qwen3.train.trainer import TrainConfig, export_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a model folder trained with the default recipe")
    parser.add_argument("output", type=Path, help="the run folder to write OUTPUT/checkpoint in")
    parser.add_argument("--at", type=int, default=4700, help="the step the model stands for (default: 4700)")
    parser.add_argument("--stage5-from", type=int, default=TrainConfig().stage5_from,
                        help="the run's first stage-5 step (default: the recipe's)")  # fmt: skip
    args = parser.parse_args()
    config = dataclasses.replace(TrainConfig(), steps=args.at, stage5_from=args.stage5_from)
    folder = export_model(
        load_model(args.model), Tokenizer.from_pretrained(args.model), args.output / "checkpoint"
    )
    save_file({}, str(folder / "optimizer.safetensors"))  # no moments: AdamW starts them afresh
    state = {"step": config.steps, "config": dataclasses.asdict(config), "adam_steps": {}, "history": []}
    (folder / "trainer_state.json").write_text(json.dumps(state) + "\n")
    print(f"wrote {folder}: continue with qwen3 train --output {args.output} --steps N --extend")


if __name__ == "__main__":
    main()
