"""The qwen3 command: help, the demo main job, generate and chat against a checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen3.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "generate", "chat", "serve", "train", "eval", "bench", "info"):
        assert command in out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "qwen3.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "Qwen3" in out.stdout


def test_python_m_qwen3_train_is_qwen3_train():
    out = subprocess.run(
        [sys.executable, "-m", "qwen3.train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--stage3-from" in out.stdout and "--extend" in out.stdout


def test_demo_decodes(capsys):
    assert main(["demo", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "logits (1, 16, 1024), finite=True" in out and "greedy continuation (8 tokens" in out


def test_generate_and_chat_one_shot(tiny_checkpoint, capsys):
    common = ["--model", str(tiny_checkpoint), "--max-model-len", "256", "--kv-cache-memory", "8MiB"]
    assert main(["generate", *common, "--temperature", "0", "--max-tokens", "5", "Hello"]) == 0
    assert main(["chat", *common, "--max-tokens", "6", "--thinking-budget", "2", "Hi"]) == 0
    assert "[6 tokens" in capsys.readouterr().out


def test_chat_repl_commands(tiny_checkpoint, monkeypatch, capsys):
    lines = iter(["/budget 3", "/no_think", "hello", "/reset", "/help", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    args = ["chat", "--model", str(tiny_checkpoint), "--max-model-len", "256", "--kv-cache-memory", "8MiB",
            "--max-tokens", "4"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "thinking budget: 3" in out and "non-thinking mode" in out and "conversation cleared" in out
    assert "[4 tokens" in out


def test_missing_model_is_a_clear_error(tmp_path, caplog):
    assert main(["info", "--model", str(tmp_path / "nope")]) == 2
    assert "not a folder" in caplog.text


def test_chat_with_the_shipped_model_by_default(capsys):
    """The README's main job: no --model means the tiny Qwen3 inside the package, and it answers."""
    assert main(["chat", "--temperature", "0", "--max-tokens", "200", "What is 12 + 30?"]) == 0
    out = capsys.readouterr().out
    assert "12 + 30 = 42." in out


def test_train_shows_its_data(tmp_path, capsys):
    args = ["train", "--output", str(tmp_path), "--tokenizer-samples", "200", "--vocab-size", "512",
            "--hidden-size", "32", "--head-dim", "16", "--intermediate-size", "64", "--show-data", "3"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("[[") >= 3 and "<|im_start|>assistant" in out
