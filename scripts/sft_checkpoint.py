"""Turn a finished model folder into a ``qwen3 train`` checkpoint, so that more SFT can continue from it.

The shipped model's own run folder (with its AdamW moments) is not in the package; this writes
``OUTPUT/checkpoint`` from the weights and tokenizer of MODEL as the state of the default recipe at its
last step, with fresh AdamW moments. Then ``qwen3 train --output OUTPUT --steps N --extend`` runs
N - 4,700 more steps of stage 4 (the agent stage's data), the cosine schedule recomputed for N steps:
the compute-matched SFT baseline of docs/tiny-model.md's GRPO section.

    .venv/bin/python scripts/sft_checkpoint.py src/qwen3/default_model runs/sft-more
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
    args = parser.parse_args()
    config = TrainConfig()
    folder = export_model(
        load_model(args.model), Tokenizer.from_pretrained(args.model), args.output / "checkpoint"
    )
    save_file({}, str(folder / "optimizer.safetensors"))  # no moments: AdamW starts them afresh
    state = {"step": config.steps, "config": dataclasses.asdict(config), "adam_steps": {}, "history": []}
    (folder / "trainer_state.json").write_text(json.dumps(state) + "\n")
    print(f"wrote {folder}: continue with qwen3 train --output {args.output} --steps N --extend")


if __name__ == "__main__":
    main()
