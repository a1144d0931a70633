#!/usr/bin/env bash
# Create .venv and install qwen3 into it. `--test` adds the test tools (pytest, ruff, transformers).
# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build on machines
# where the pinned CPU wheel is provided locally (our CI); elsewhere pip picks the right build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
