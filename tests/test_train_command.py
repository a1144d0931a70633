"""``qwen3 train --stage ...``: each stage's flags, refused for the others; a GRPO run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen3.cli import main
from qwen3.llm import LLM


def _usage_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_flags_of_another_stage_are_refused(tmp_path: Path, capsys) -> None:
    err = _usage_error(["--output", str(tmp_path), "--group-size", "4"], capsys)
    assert "--group-size: not an option of --stage sft" in err
    err = _usage_error(
        ["--stage", "grpo", "--output", str(tmp_path), "--extend", "--hidden-size", "64"], capsys
    )
    assert "--hidden-size" in err and "--extend" in err and "--stage grpo" in err
    err = _usage_error(["--stage", "grpo", "--output", str(tmp_path), "--teacher", "x"], capsys)
    assert "--teacher: not an option of --stage grpo" in err


def test_stage_values_are_checked(tmp_path: Path, capsys) -> None:
    assert "needs --teacher" in _usage_error(["--stage", "distill", "--output", str(tmp_path)], capsys)
    err = _usage_error(["--stage", "grpo", "--output", str(tmp_path), "--group-size", "1"], capsys)
    assert "group_size must be >= 2" in err
    err = _usage_error(["--stage", "grpo", "--output", str(tmp_path), "--clip-eps", "1.5"], capsys)
    assert "clip_eps must be in (0, 1)" in err
    assert "invalid choice" in _usage_error(["--stage", "rl", "--output", str(tmp_path)], capsys)


def test_grpo_command_writes_a_model_that_loads(tmp_path: Path) -> None:
    threads = torch.get_num_threads()  # --threads 1 sets it for the process
    try:
        args = ["train", "--stage", "grpo", "--output", str(tmp_path), "--steps", "2", "--prompts-per-step",
                "3", "--group-size", "2", "--max-tokens", "32", "--threads", "1"]  # fmt: skip
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path / "model"
    assert (folder / "grpo_state.json").is_file() and (tmp_path / "reward.png").is_file()
    llm = LLM(folder, max_num_seqs=2, kv_cache_memory="64MiB", progress=False)
    out = llm.chat([{"role": "user", "content": "What is 12 + 30?"}], enable_thinking=False)
    assert out.content


def test_distill_command_writes_a_student(tmp_path: Path) -> None:
    from qwen3.llm import default_model_dir

    args = ["train", "--stage", "distill", "--teacher", str(default_model_dir()), "--output", str(tmp_path),
            "--steps", "2", "--offpolicy-steps", "1", "--prompts-per-step", "2", "--max-tokens", "16",
            "--student-layers", "1", "--student-hidden", "64", "--student-intermediate", "64", "--threads", "1"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    state = json.loads((tmp_path / "model" / "distill_state.json").read_text())
    assert [h["phase"] for h in state["history"]] == ["off-policy", "on-policy"]
    assert (tmp_path / "loss.png").is_file()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (1, 64, 1024)
