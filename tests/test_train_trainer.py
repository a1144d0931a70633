"""The training loop: the loss falls, a resumed run equals an uninterrupted one, two data-parallel
processes equal one, and the exported folder loads in qwen3 and in transformers alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3.train.trainer import TrainConfig, Trainer

TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 128,
    "tokens_per_step": 2048,
    "micro_batch_tokens": 1024,
    "tokenizer_samples": 300,
    "warmup_steps": 2,
    "lr": 3e-3,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def test_loss_falls_in_every_stage(tmp_path: Path) -> None:
    config = _config(
        steps=56, stage1_steps=20, stage3_from=40, stage4_from=44, stage5_from=48, stage6_from=52
    )
    history = Trainer(config, tmp_path, progress=False).train(save_every=0)
    losses = [h["loss"] for h in history]
    assert [h["stage"] for h in history] == [1] * 20 + [2] * 20 + [3] * 4 + [4] * 4 + [5] * 4 + [6] * 4
    assert sum(losses[36:41]) / 5 < 0.6 * sum(losses[:3]) / 3, losses  # stage 1 learns the procedures
    assert min(losses[20:]) < losses[20], losses  # and stage 2 keeps improving on the chat format
    # stages 5 and 6 (other languages, composed phrasings) are new text, yet far from the untrained loss
    assert max(losses[48:]) < 0.8 * losses[0], losses


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    config = _config(steps=6, stage1_steps=2)
    straight = Trainer(config, tmp_path / "a", progress=False)
    straight.train(save_every=0)
    first = Trainer(config, tmp_path / "b", progress=False)
    first.train(save_every=3, until=3)
    first.save_checkpoint()
    resumed = Trainer(config, tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 3
    resumed.train(save_every=0)
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history], rel=1e-5
    )
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    Trainer(_config(steps=2, stage1_steps=1), tmp_path, progress=False).save_checkpoint()
    other = Trainer(_config(steps=2, stage1_steps=1, lr=1e-3), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        other.resume()
    longer = Trainer(_config(steps=4, stage1_steps=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="steps"):
        longer.resume()
    assert longer.resume(extend=True) and longer.step == 0
    longer.train(save_every=0)
    assert longer.step == 4


def _cli_args(output: Path, **config) -> list[str]:
    args = ["train", "--output", str(output), "--threads", "1", "--save-every", "0"]
    for key, value in {**TINY, **config}.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def test_two_data_parallel_processes_give_the_one_process_loss_curve(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = {"steps": 4, "stage1_steps": 2}
    subprocess.run([sys.executable, "-m", "qwen3", *_cli_args(tmp_path / "one", **config)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, "-m", "qwen3", *_cli_args(tmp_path / "two", **config)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "checkpoint" / "trainer_state.json").read_text())["history"]
    two = json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())["history"]
    assert [h["tokens"] for h in two] == [h["tokens"] for h in one]  # the same global batches
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one], rel=1e-4)


def test_exported_folder_loads_in_qwen3_and_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import qwen3

    trainer = Trainer(_config(steps=2, stage1_steps=1), tmp_path, progress=False)
    trainer.train(save_every=0)
    folder = trainer.export(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    generation = json.loads((folder / "generation_config.json").read_text())
    tok = qwen3.Tokenizer.from_pretrained(folder)
    assert generation["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])])
    ours = qwen3.load_model(folder, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(ids), trainer.model.eval()(ids), rtol=0, atol=0)
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert ref_tok.chat_template == tok.chat_template
