"""``python -m qwen3``: the ``qwen3`` command (also what ``torchrun -m qwen3 train`` starts)."""

import sys

from qwen3.cli import main

sys.exit(main())
