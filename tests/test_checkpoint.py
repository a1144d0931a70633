"""Bad checkpoints fail with a CheckpointError naming the file and tensor; the Hub path resolves ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3 import CheckpointError, ModelNotFoundError, load_model, save_model
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


# --------------------------------------------------------------------------------------------- FP8

FP8_BLOCK = 128


def _requantized(folder, out, encode, quantization_config):
    """``folder`` rewritten with every linear weight (not the embeddings, lm_head, norms or router) replaced
    by ``encode(name, weight) -> (tensors to store, the weight they decode to)``, and beside it the float
    checkpoint those tensors decode to (the reference)."""
    shutil.copytree(folder, out)
    reference = out.parent / (out.name + "-dequantized")
    shutil.copytree(folder, reference)
    quantized, decoded = {}, {}
    for name, weight in load_file(folder / SINGLE_FILE).items():
        if name.endswith("proj.weight") and weight.dim() == 2:
            stored, decoded[name] = encode(name, weight)
            quantized.update(stored)
        else:
            quantized[name] = decoded[name] = weight
    save_file(quantized, out / SINGLE_FILE, metadata={"format": "pt"})
    save_file(decoded, reference / SINGLE_FILE, metadata={"format": "pt"})
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(raw))
    return out, reference


def _to_fp8(folder, out, scale_dtype=torch.float32):
    """The way Qwen's -FP8 checkpoints are stored: float8_e4m3fn blocks of 128 x 128 with a multiplier each."""

    def encode(name, weight):
        rows, cols = weight.shape
        grid = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
        padded = torch.zeros(grid[0] * FP8_BLOCK, grid[1] * FP8_BLOCK)
        padded[:rows, :cols] = weight.float()
        blocks = padded.view(grid[0], FP8_BLOCK, grid[1], FP8_BLOCK)
        scale = (blocks.abs().amax(dim=(1, 3)) / 448).clamp_min(1e-12).to(scale_dtype)
        expanded = scale.float()[:, None, :, None].expand_as(blocks)
        fp8 = (blocks / expanded).to(torch.float8_e4m3fn)
        stored = {name: fp8.reshape(padded.shape)[:rows, :cols].contiguous(), name + "_scale_inv": scale}
        return stored, (fp8.float() * expanded).reshape(padded.shape)[:rows, :cols].to(
            weight.dtype
        ).contiguous()

    config = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    return _requantized(folder, out, encode, config)


@pytest.mark.parametrize(("moe", "scale_dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_fp8_checkpoints_load_as_the_blocks_they_hold(tmp_path, moe, scale_dtype):
    """Qwen's fine-grained FP8 format, dense and MoE (experts one tensor each), float32 or bf16 scales:
    logits equal transformers' on the weights the blocks decode to."""
    from tests.reference import load_reference

    shape = dict(
        hidden_size=256, intermediate_size=320, head_dim=64, num_attention_heads=4, num_key_value_heads=2
    )
    folder = make_hf_checkpoint(
        tmp_path / "float", moe=moe, **shape, **({"moe_intermediate_size": 160} if moe else {})
    )
    fp8, reference = _to_fp8(folder, tmp_path / "fp8", scale_dtype)
    model = load_model(fp8, dtype="float32", progress=False)
    assert model.config.fp8_block == (128, 128)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), load_reference(reference).float()(ids).logits, atol=1e-4, rtol=0
        )
    saved = tmp_path / "saved"
    save_model(model, saved)  # written back as plain floats: no quantization_config
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())


def test_broken_fp8_checkpoints_name_the_tensor(tmp_path):
    shape = dict(
        hidden_size=256, intermediate_size=320, head_dim=64, num_attention_heads=4, num_key_value_heads=2
    )
    fp8, _ = _to_fp8(make_hf_checkpoint(tmp_path / "float", **shape), tmp_path / "fp8")
    tensors = load_file(fp8 / SINGLE_FILE)
    name = "model.layers.0.mlp.down_proj.weight"

    def broken(edit, config_change=None):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(fp8, folder)
        changed = dict(tensors)
        edit(changed)
        save_file(changed, folder / SINGLE_FILE, metadata={"format": "pt"})
        if config_change is not None:
            raw = json.loads((folder / "config.json").read_text())
            raw.update(config_change)
            (folder / "config.json").write_text(json.dumps(raw))
        return folder

    cases = [
        (
            broken(lambda t: t.pop(name + "_scale_inv")),
            r"down_proj\.weight' is quantized but its .*scale_inv' is missing",
        ),
        (
            broken(lambda t: t.update({name + "_scale_inv": torch.ones(1, 1)})),
            r"down_proj\.weight_scale_inv' has shape",
        ),
        (broken(lambda t: None, {"quantization_config": None}), r"is float8, but config\.json has no fp8"),
        (
            broken(lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1)})),
            r"no quantized weight of its prefix",
        ),
        (
            broken(lambda t: None, {"quantization_config": {"quant_method": "gptq"}}),
            r"quant_method 'gptq' is not supported",
        ),
    ]
    for folder, match in cases:
        with pytest.raises(CheckpointError, match=match):
            load_model(folder, progress=False)


# --------------------------------------------------------------------------------------------- AWQ

AWQ_GROUP = 16  # divides every input width of the tiny test models (48, 64, 96)
AWQ_PACK_ORDER = [
    0,
    2,
    4,
    6,
    1,
    3,
    5,
    7,
]  # AutoAWQ's GEMM order: nibble i of a word holds column col*8 + ORDER[i]


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int ``[rows, cols]`` of 0..15 -> int32 ``[rows, cols/8]``, nibble by nibble as AutoAWQ's packer does."""
    rows, cols = values.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + AWQ_PACK_ORDER[i]].long() << (4 * i)
    return packed.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else packed.to(torch.int32)


def _to_awq(folder, out):
    """4-bit AWQ GEMM tensors: asymmetric, a scale and zero per group of input rows."""

    def encode(name, weight):
        w = weight.float().T  # [in, out]
        groups = w.view(w.shape[0] // AWQ_GROUP, AWQ_GROUP, w.shape[1])
        low, high = groups.amin(dim=1), groups.amax(dim=1)
        scale = ((high - low) / 15).clamp_min(1e-8)
        zero = (-low / scale).round().clamp(0, 15)
        q = (groups / scale[:, None] + zero[:, None]).round().clamp(0, 15).view_as(w).to(torch.int32)
        prefix = name.removesuffix(".weight")
        stored = {
            prefix + ".qweight": _pack_awq(q),
            prefix + ".qzeros": _pack_awq(zero.to(torch.int32)),
            prefix + ".scales": scale.half(),
        }
        full_zero = zero.repeat_interleave(AWQ_GROUP, 0)
        full_scale = scale.half().float().repeat_interleave(AWQ_GROUP, 0)
        return stored, ((q.float() - full_zero) * full_scale).T.contiguous().to(weight.dtype)

    config = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": AWQ_GROUP,
        "version": "gemm",
        "zero_point": True,
    }
    return _requantized(folder, out, encode, config)


@pytest.mark.parametrize("moe", [False, True])
def test_awq_checkpoints_load_as_the_weights_they_pack(tmp_path, moe):
    from tests.reference import load_reference

    folder = make_hf_checkpoint(tmp_path / "float", moe=moe)
    awq, reference = _to_awq(folder, tmp_path / "awq")
    model = load_model(awq, dtype="float32", progress=False)
    assert model.config.awq_group_size == AWQ_GROUP
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), load_reference(reference).float()(ids).logits, atol=1e-4, rtol=0
        )
    tensors = load_file(awq / SINGLE_FILE)
    tensors.pop("model.layers.0.self_attn.o_proj.scales")
    save_file(tensors, awq / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"o_proj\.qweight' is quantized but its .*o_proj\.scales' is missing"
    ):
        load_model(awq, progress=False)
