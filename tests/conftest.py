"""Shared fixtures: the ../shared/spec folder and random-initialised reference checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    """../shared/spec beside the repo (always there in CI); tests that need it skip without it."""
    if not SPEC_DIR.is_dir():
        pytest.skip(f"{SPEC_DIR} is absent (it holds the Qwen3 reference files; CI always has it)")
    return SPEC_DIR


@pytest.fixture(scope="session")
def tiny_checkpoint(spec_dir, tmp_path_factory) -> Path:
    """A random 2-layer Qwen3 with the real vocabulary, tokenizer files and generation config."""
    import shutil

    from tests.reference import make_hf_checkpoint

    folder = make_hf_checkpoint(tmp_path_factory.mktemp("tiny"), vocab_size=151936, num_hidden_layers=2)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(spec_dir / "tokenizer" / name, folder / name)
    shutil.copy(spec_dir / "hf_qwen3_0.6b" / "generation_config.json", folder / "generation_config.json")
    return folder


@pytest.fixture(scope="session")
def default_llm():
    """The tiny Qwen3 shipped inside the package, with an engine sized for evaluation batches."""
    from qwen3.llm import LLM

    return LLM(None, max_num_seqs=256, max_num_batched_tokens=8192, kv_cache_memory="512MiB", progress=False)


@pytest.fixture
def one_thread():
    """Training tests on one thread: models this small train fastest so (two spend their time
    synchronising), and the second core stays free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
