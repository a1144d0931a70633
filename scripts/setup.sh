#!/usr/bin/env bash
# Create .venv and install qwen3 into it. `--test` adds the test tools (pytest, ruff, transformers), and
# Debian's headless Chromium for the web page's browser tests when it is missing and apt-get can install it.
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
  if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver for the browser tests (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } >/dev/null \
      || echo "warning: could not install chromium; the browser tests will skip (and fail in CI)" >&2
  fi
else
  .venv/bin/python -m pip install -q -e .
fi
