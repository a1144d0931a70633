"""``python -m qwen3.train ARGS`` is ``qwen3 train ARGS`` (also ``torchrun -m qwen3.train ARGS``)."""

import sys

from qwen3.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
