"""Bad checkpoints fail with a CheckpointError naming the file and tensor; the Hub path resolves ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3 import CheckpointError, ModelNotFoundError, load_model
from qwen3.checkpoint import INDEX_FILE, SINGLE_FILE
from tests.reference import make_hf_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("good"))


@pytest.fixture
def bad(good, tmp_path):
    """A fresh copy of a good checkpoint to break."""
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    return folder


def edit_tensors(folder, edit):
    path = folder / SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_unknown_model_type(bad):
    edit_config(bad, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama'"):
        load_model(bad)


def test_architecture_contradicting_model_type(bad):
    edit_config(bad, architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(CheckpointError, match=r"config\.json.*Qwen3MoeForCausalLM"):
        load_model(bad)


def test_missing_tensor(bad):
    edit_tensors(bad, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*missing.*layers\.1\.self_attn\.k_norm\.weight"
    ):
        load_model(bad)


def test_unexpected_tensor(bad):
    edit_tensors(bad, lambda t: t.update({"model.layers.0.mlp.shared_expert.weight": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected.*shared_expert"):
        load_model(bad)


def test_shape_mismatch(bad):
    edit_tensors(bad, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(95, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*up_proj.*\(95, 64\).*\(96, 64\)"):
        load_model(bad)


def test_dtype_mismatch(bad):
    edit_tensors(bad, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.norm\.weight.*int32"):
        load_model(bad)


def test_truncated_file(bad):
    path = bad / SINGLE_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a readable safetensors"):
        load_model(bad)


def test_corrupt_header(bad):
    path = bad / SINGLE_FILE
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(bad)


def test_index_naming_a_missing_shard(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((folder / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json.*{shard}.*does not exist"):
        load_model(folder)


@pytest.mark.parametrize(
    "shard",
    ["/etc/hostname", "../outside.safetensors", "sub/../../x.safetensors", "", 5, None, "a\\b.safetensors"],
)
def test_index_paths_stay_inside_the_folder(bad, shard, monkeypatch):
    (bad / SINGLE_FILE).rename(bad / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(
        load_file(bad / "model-00001-of-00001.safetensors"), "model-00001-of-00001.safetensors"
    )
    weight_map["lm_head.weight"] = shard
    (bad / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    opened = []
    real_open = type(bad).is_file
    monkeypatch.setattr(type(bad), "is_file", lambda path: opened.append(str(path)) or real_open(path))
    with pytest.raises(CheckpointError, match=r"index\.json: .* is not a file name inside"):
        load_model(bad)
    assert not any("hostname" in p or "outside" in p for p in opened)  # refused before it was looked at


@pytest.mark.parametrize("index", ["[]", '{"weight_map": []}', '{"weight_map": "x"}', "{", '{"other": 1}'])
def test_malformed_index(bad, index):
    (bad / INDEX_FILE).write_text(index)
    with pytest.raises(CheckpointError, match=r"index\.json"):
        load_model(bad)


@pytest.mark.parametrize("config", ["[1, 2]", '"text"', "{", '{"model_type": "qwen3", "vocab_size": "big"}'])
def test_malformed_config_json(bad, config):
    (bad / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(bad)


def test_a_config_too_large_for_this_machine_fails_before_allocating(bad, monkeypatch):
    edit_config(bad, vocab_size=2**22, hidden_size=2**16, intermediate_size=2**18, num_hidden_layers=1024)
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(CheckpointError, match=r"config\.json: the model it describes needs .* GiB"):
        load_model(bad)


@pytest.mark.parametrize(
    "generation", ['{"temperature": "hot"}', '{"top_k": -5}', '{"eos_token_id": "x"}', "[]", "{"]
)
def test_malformed_generation_config_fails_before_the_weights(bad, generation, monkeypatch):
    from qwen3 import checkpoint, llm

    (bad / "generation_config.json").write_text(generation)
    monkeypatch.setattr(llm, "load_model", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(CheckpointError, match=r"generation_config\.json"):
        llm.LLM(str(bad), skip_tokenizer_init=True, kv_cache_memory="4MiB", progress=False)
    assert checkpoint.CheckpointError is CheckpointError


def test_pickled_weights_are_never_loaded(bad, monkeypatch):
    (bad / SINGLE_FILE).rename(bad / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loaded"):
        load_model(bad)


def test_missing_config(bad):
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(bad)


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        load_model(tmp_path / "does-not-exist")


def test_hub_id_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(
        ModelNotFoundError, match=r"Qwen/Qwen3-0\.6B.*not in the local Hugging Face cache.*OFFLINE"
    ):
        load_model("Qwen/Qwen3-0.6B")


def test_hub_id_resolves_from_the_cache(good, tmp_path, monkeypatch):
    """A repo id found in the Hugging Face cache (laid out as huggingface_hub lays it out) loads offline."""
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--Qwen--Qwen3-Tiny" / "snapshots" / revision
    shutil.copytree(good, snapshot)
    (cache / "models--Qwen--Qwen3-Tiny" / "refs").mkdir()
    (cache / "models--Qwen--Qwen3-Tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    model = load_model("Qwen/Qwen3-Tiny", progress=False)
    local = load_model(good, progress=False)
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(model(ids), local(ids))
