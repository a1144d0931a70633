"""Shared fixtures: the ../shared/spec folder and random-initialised reference checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    """../shared/spec beside the repo (always there in CI); tests that need it skip without it."""
    if not SPEC_DIR.is_dir():
        pytest.skip(f"{SPEC_DIR} is absent (it holds the Qwen3 reference files; CI always has it)")
    return SPEC_DIR
