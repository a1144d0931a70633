"""GGUF files in and out: config, tokenizer and weights of every type, checked against transformers and
llama.cpp's own ``gguf`` package; broken files fail with the file and tensor named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qwen3 import CheckpointError, SamplingParams, StructuredOutputs, load_model
from qwen3.gguf_checkpoint import SUPPORTED_TYPES, GGUFCheckpoint, dequantize, save_gguf
from qwen3.gguf_random import random_blocks
from qwen3.llm import LLM, default_model_dir
from qwen3.tokenizer import Tokenizer
from tests.reference import load_reference, make_hf_checkpoint
from tests.test_tokenizer import CORPUS

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
PROMPT = [[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]]


@pytest.fixture(scope="module")
def source(tiny_checkpoint):
    """The random 2-layer Qwen3 with the real vocabulary, in float32, and its tokenizer."""
    return load_model(tiny_checkpoint, dtype="float32", progress=False), Tokenizer.from_pretrained(
        tiny_checkpoint
    )


class _Files(dict):
    """The source written in each quant type, on first use."""

    def __init__(self, source, folder):
        super().__init__()
        self.source, self.folder = source, folder

    def __missing__(self, quant):
        model, tokenizer = self.source
        self[quant] = save_gguf(model, tokenizer, self.folder / f"tiny-{quant}.gguf", quant, progress=False)
        return self[quant]


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    return _Files(source, tmp_path_factory.mktemp("gguf"))


def reference_on(path, hf_folder) -> torch.nn.Module:
    """transformers' model with every weight replaced by gguf's own dequantization of the file's tensor."""
    reference = load_reference(hf_folder)
    tensors = GGUFCheckpoint(path).tensors  # parsed by qwen3 (gguf's reader takes seconds on 151,936 tokens)
    hf_names = {
        "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }  # fmt: skip
    layer_names = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
    }  # fmt: skip
    state = reference.state_dict()
    for tensor in tensors:
        values = torch.from_numpy(
            np.array(gguf.quants.dequantize(tensor.data, tensor.type), dtype=np.float32)
        )
        values = values.reshape(tensor.shape)
        name = tensor.name
        if name in hf_names:
            state[hf_names[name]] = values
            continue
        _, layer, kind, _ = name.split(".")
        if kind.endswith("_exps"):  # transformers 5 keeps the experts fused: gate_up_proj [E, 2 ff, hidden]
            experts = f"model.layers.{layer}.mlp.experts."
            if kind == "ffn_down_exps":
                state[experts + "down_proj"] = values
            else:
                fused = state[experts + "gate_up_proj"].clone()
                size = fused.shape[1] // 2
                fused[:, slice(0, size) if kind == "ffn_gate_exps" else slice(size, None)] = values
                state[experts + "gate_up_proj"] = fused
        else:
            state[f"model.layers.{layer}.{layer_names[kind]}.weight"] = values
    reference.load_state_dict(state, strict=True)
    return reference.float().eval()


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q5_0", "q4_1"])  # bf16, q4_0, q5_1 and f32: below
def test_float32_load_matches_transformers_on_the_dequantized_weights(files, tiny_checkpoint, quant):
    model = load_model(files[quant], dtype="float32", progress=False)
    reference = reference_on(files[quant], tiny_checkpoint)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_the_float32_file_is_the_source_checkpoint_exactly(files, source):
    model = load_model(files["f32"], dtype="float32", progress=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), source[0].state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q4_0", "q5_1"])
def test_the_default_bf16_path_agrees_with_the_float32_reference(files, quant):
    """The file run as qwen3 runs it by default (quantized kernels on quantized blocks, bf16 kernels for bf16)
    against float32 on the same weights."""
    fast = load_model(files[quant], progress=False)
    exact = load_model(files[quant], dtype="float32", progress=False)
    assert fast.dtype == torch.bfloat16
    ids = torch.randint(0, 151643, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, q = exact(ids).log_softmax(-1), fast(ids).float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agreement = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert kl < 0.02 and agreement > 0.9, (kl, agreement)


def test_the_tokenizer_and_template_come_from_the_metadata(files, source):
    _, tokenizer = source
    from_gguf = GGUFCheckpoint(files["q8_0"]).tokenizer()
    for text in CORPUS:
        assert from_gguf.encode(text) == tokenizer.encode(text), text
    assert from_gguf.chat_template == tokenizer.chat_template
    assert (from_gguf.eos_token, from_gguf.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert from_gguf.vocab_size == tokenizer.vocab_size == 151669


def test_llama_cpp_reads_what_we_write(tmp_path):
    """gguf-py is llama.cpp's own reader: our keys, names and types are the converter's."""
    model = load_model(default_model_dir(), progress=False)
    path = save_gguf(
        model, Tokenizer.from_pretrained(default_model_dir()), tmp_path / "q4_0.gguf", "q4_0", progress=False
    )
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    config = model.config
    assert (
        fields["general.architecture"] == "qwen3" and fields["qwen3.block_count"] == config.num_hidden_layers
    )
    assert fields["qwen3.attention.key_length"] == config.head_dim and fields["general.file_type"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in types) == (not config.tie_word_embeddings)
    ours = GGUFCheckpoint(path)  # and qwen3's own parser reads the same
    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in ours.fields.items()}
    assert {k: v for k, v in plain.items() if not isinstance(v, float)} == {
        k: v for k, v in fields.items() if not k.startswith("GGUF.") and not isinstance(v, float)
    }


def test_k_quants_mixed_in_one_file_dequantize_as_gguf_does(tmp_path):
    """A file like llama-quantize's Q4_K_M (K-quants of several types side by side, norms F32): every
    parameter is exactly gguf.quants.dequantize of its tensor."""
    hf = make_hf_checkpoint(
        tmp_path / "hf", vocab_size=1024, hidden_size=256, intermediate_size=512, head_dim=64
    )
    model = load_model(hf, dtype="float32", progress=False)
    plain = save_gguf(
        model, Tokenizer.from_pretrained(default_model_dir()), tmp_path / "f32.gguf", "f32", progress=False
    )
    reader = gguf.GGUFReader(plain)
    rng = np.random.default_rng(0)
    kinds = [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q3_K, Q.Q2_K]
    writer = gguf.GGUFWriter(tmp_path / "mixed.gguf", "qwen3")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else field.types[0]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    written = {}
    for i, tensor in enumerate(reader.tensors):
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if len(shape) == 2 and shape[1] % 256 == 0:
            qtype = kinds[i % len(kinds)]
            writer.add_tensor(tensor.name, random_blocks(qtype.name, shape, rng), raw_dtype=qtype)
            written[tensor.name] = qtype.name
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert set(written.values()) == {k.name for k in kinds}
    loaded = load_model(tmp_path / "mixed.gguf", dtype="float32", progress=False)
    checkpoint = GGUFCheckpoint(tmp_path / "mixed.gguf")
    by_name = {t.name: t for t in checkpoint.tensors}
    q_rows = loaded.config.num_attention_heads * loaded.config.head_dim
    expected_q = gguf.quants.dequantize(
        by_name["blk.0.attn_q.weight"].data, by_name["blk.0.attn_q.weight"].type
    )
    assert np.array_equal(
        loaded.model.layers[0].self_attn.qkv_proj.weight[:q_rows].detach().numpy(), expected_q
    )
    for name in written:
        values = dequantize(by_name[name])
        assert np.isfinite(values).all() and values.shape == by_name[name].shape
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(loaded(ids)).all()


def test_moe_gguf_matches_transformers(tmp_path, source):
    # norm_topk_prob: llama.cpp assumes it for qwen3moe (every released Qwen3 MoE has it), so the source too
    hf = make_hf_checkpoint(
        tmp_path / "moe", moe=True, vocab_size=151936, num_hidden_layers=2, norm_topk_prob=True
    )
    model = load_model(hf, dtype="float32", progress=False)
    path = save_gguf(model, source[1], tmp_path / "moe-q8_0.gguf", "q8_0", progress=False)
    types = {t.name: t.type.name for t in GGUFCheckpoint(path).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    loaded = load_model(path, dtype="float32", progress=False)
    assert loaded.config.is_moe and loaded.config.norm_topk_prob
    reference = reference_on(path, hf)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_llm_chat_and_the_cli_take_a_gguf(files, tmp_path):
    llm = LLM(str(files["q8_0"]), max_model_len=256, kv_cache_memory="8MiB", progress=False)
    out = llm.chat([{"role": "user", "content": "Hi"}], thinking_budget=4)
    assert out.token_ids and llm.model_dir == files["q8_0"]
    # the tokenizer rebuilt from the file's metadata serves structured outputs too
    held = SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=StructuredOutputs(choice=["yes", "no"])
    )
    assert llm.chat([{"role": "user", "content": "Hi"}], held, enable_thinking=False).content in ("yes", "no")
    target = tmp_path / "default-q4_0.gguf"
    cli = [sys.executable, "-m", "qwen3.cli"]
    subprocess.run([*cli, "quantize", str(default_model_dir()), str(target), "--type", "q4_0"], check=True)
    done = subprocess.run(
        [*cli, "generate", "--model", str(target), "What is 2 + 3?", "--max-tokens", "4", "--temperature", "0"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert done.stdout.strip()
    info = json.loads(
        subprocess.run([*cli, "info", "--model", str(target)], check=True, capture_output=True).stdout
    )
    assert info["dtype"] == "F32, Q4_0, Q8_0" and info["layers"] == 4


# --------------------------------------------------------------------------------------------- broken files


def _value_type(value):
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, int):
        return V.UINT32 if 0 <= value < 2**32 else V.INT64
    return V.FLOAT32 if isinstance(value, float) else V.STRING


def _rewrite(path, out, skip=(), extra=None, change=None, retype=None):
    """Copy a GGUF with tensors left out, added or retyped (``retype``: name -> (data, type)), or metadata
    changed; written with gguf's own writer."""
    checkpoint = GGUFCheckpoint(path)
    change = change or {}
    writer = gguf.GGUFWriter(out, change.get("general.architecture", checkpoint.arch))
    for key, value in {**checkpoint.fields, **change}.items():
        if key == "general.architecture":
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(
                key, value, _value_type(value) if key in change else checkpoint.field_types[key]
            )
    for tensor in checkpoint.tensors:
        if tensor.name in skip:
            continue
        data, qtype = (retype or {}).get(tensor.name, (tensor.data, tensor.type))
        writer.add_tensor(tensor.name, np.array(data), raw_dtype=qtype)
    for name, (data, qtype) in (extra or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_broken_files_name_the_file_and_tensor(files, tmp_path):
    good = files["q8_0"]
    data = good.read_bytes()
    cases = {
        "truncated": (data[: len(data) - 1000], r"tensor '.*': its data runs past the end"),
        "header cut": (data[:5000], r"not a readable GGUF file"),
        "no magic": (b"GGML" + data[4:], r"no GGUF magic"),
        "empty": (b"", r"not a readable GGUF file"),
        "huge counts": (data[:8] + (2**60).to_bytes(8, "little") + data[16:], r"cannot fit"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match) as info:
            load_model(path, progress=False)
        assert str(path) in str(info.value), name
    missing = _rewrite(good, tmp_path / "missing.gguf", skip={"blk.1.ffn_down.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.mlp\.down_proj"):
        load_model(missing, progress=False)
    extra = _rewrite(
        good, tmp_path / "extra.gguf", extra={"blk.0.mystery.weight": (np.zeros(4, np.float32), Q.F32)}
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blk\.0\.mystery\.weight'"):
        load_model(extra, progress=False)
    wrong = _rewrite(good, tmp_path / "shape.gguf", change={"qwen3.feed_forward_length": 64})
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_gate\.weight' has shape"):
        load_model(wrong, progress=False)
    arch = _rewrite(good, tmp_path / "arch.gguf", change={"general.architecture": "llama"})
    with pytest.raises(CheckpointError, match=r"general\.architecture 'llama' is not Qwen3"):
        load_model(arch, progress=False)
    block, block_bytes = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    odd = np.zeros((64, 64 // block * block_bytes), np.uint8)  # a real type qwen3 does not read
    unsupported = _rewrite(good, tmp_path / "iq.gguf", skip={"blk.0.attn_k.weight"},
                           extra={"blk.0.attn_k.weight": (odd, Q.IQ4_NL)})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.attn_k\.weight' has type IQ4_NL"):
        load_model(unsupported, progress=False)
    assert "IQ4_NL" not in SUPPORTED_TYPES


def test_metadata_is_validated_like_config_json(files, tmp_path):
    good = files["q8_0"]
    for change, match in (
        ({"qwen3.block_count": 10**6}, "num_hidden_layers must be an integer in"),
        ({"qwen3.attention.key_length": 0}, "head_dim must be an integer in"),
        ({"tokenizer.ggml.model": "llama"}, "does not describe a byte-level BPE"),
    ):
        path = _rewrite(good, tmp_path / "bad.gguf", change=change)
        with pytest.raises(CheckpointError, match=match):
            LLM(str(path), kv_cache_memory="8MiB", progress=False)


def test_hub_repos_of_gguf_files_resolve_by_file_or_quant_type(files, tmp_path, monkeypatch):
    """owner/repo:FILE.gguf and owner/repo:QUANT, from a Hugging Face cache laid out as huggingface_hub
    lays it out (offline)."""
    from qwen3.hub import ModelNotFoundError

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--Qwen--Qwen3-Tiny-GGUF" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for quant in ("q8_0", "q4_0"):
        (snapshot / f"Qwen3-Tiny-{quant.upper()}.gguf").symlink_to(files[quant])
    (cache / "models--Qwen--Qwen3-Tiny-GGUF" / "refs").mkdir()
    (cache / "models--Qwen--Qwen3-Tiny-GGUF" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    by_type = load_model("Qwen/Qwen3-Tiny-GGUF:q8_0", dtype="float32", progress=False)
    by_file = load_model("Qwen/Qwen3-Tiny-GGUF:Qwen3-Tiny-Q8_0.gguf", dtype="float32", progress=False)
    local = load_model(files["q8_0"], dtype="float32", progress=False)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        assert torch.equal(by_type(ids), local(ids)) and torch.equal(by_file(ids), local(ids))
    with pytest.raises(ModelNotFoundError, match="0 GGUF files of that type"):
        load_model("Qwen/Qwen3-Tiny-GGUF:Q6_K", progress=False)


def _corrupt(good, tmp_path, name, edit) -> object:
    """A copy of ``good`` with its header rewritten by ``edit(bytearray, checkpoint)``."""
    data = bytearray(good.read_bytes())
    edit(data, GGUFCheckpoint(good))
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(bytes(data))
    return path


def test_hostile_headers_are_refused_cheaply(files, tmp_path):
    """Found in review: huge dimension counts, bad alignment, overlapping or unaligned data, duplicate
    names, wrong-typed metadata: all a CheckpointError naming the file, none a crash or a long walk."""
    good = files["q8_0"]
    cases = [
        (_rewrite(good, tmp_path / "align.gguf", change={"general.alignment": 3}), "not a power of two"),
        (_rewrite(good, tmp_path / "types.gguf", change={"tokenizer.ggml.tokens": 5}), "is not a list"),
        (_rewrite(good, tmp_path / "eos.gguf", change={"tokenizer.ggml.eos_token_id": "x"}), "is not a int"),
        (_rewrite(good, tmp_path / "rope.gguf", change={"qwen3.rope.scaling.type": "yarn"}), "without a factor"),
    ]  # fmt: skip
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match) as info:
            LLM(str(path), kv_cache_memory="8MiB", progress=False)
        assert str(path) in str(info.value)
    checkpoint = GGUFCheckpoint(good)
    first, second = checkpoint.tensors[0], checkpoint.tensors[1]
    data = good.read_bytes()
    # the first tensor info follows the metadata: its name, then n_dims (u32)
    name = first.name.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    huge_dims = bytearray(data)
    huge_dims[at : at + 4] = (2**32 - 1).to_bytes(4, "little")
    path = tmp_path / "dims.gguf"
    path.write_bytes(bytes(huge_dims))
    with pytest.raises(CheckpointError, match="dimensions"):
        GGUFCheckpoint(path)
    # blk.0.attn_k's name rewritten to blk.0.attn_q's (same length): a duplicate
    duplicate = data.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight", 1)
    path.write_bytes(duplicate)
    with pytest.raises(CheckpointError, match="same name"):
        GGUFCheckpoint(path)
    # the second tensor's data offset set to the first's (overlap), or moved by one byte (unaligned)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    offset_at = at + 4 + 8 * n_dims + 4
    overlapping = bytearray(data)
    other = second.name.encode()
    second_at = data.index(len(other).to_bytes(8, "little") + other) + 8 + len(other)
    second_dims = int.from_bytes(data[second_at : second_at + 4], "little")
    second_offset_at = second_at + 4 + 8 * second_dims + 4
    overlapping[second_offset_at : second_offset_at + 8] = data[offset_at : offset_at + 8]
    path.write_bytes(bytes(overlapping))
    with pytest.raises(CheckpointError, match="overlap"):
        GGUFCheckpoint(path)
    unaligned = bytearray(data)
    unaligned[second_offset_at : second_offset_at + 8] = (
        int.from_bytes(data[second_offset_at : second_offset_at + 8], "little") + 1
    ).to_bytes(8, "little")
    path.write_bytes(bytes(unaligned))
    with pytest.raises(CheckpointError, match="not aligned"):
        GGUFCheckpoint(path)


def test_gguf_models_keep_qwen_stop_ids_sampling_and_fim_tokens(files):
    llm = LLM(str(files["q8_0"]), max_model_len=256, kv_cache_memory="8MiB", progress=False)
    assert llm.engine.config.eos_token_ids >= {151645, 151643}  # <|im_end|> and <|endoftext|>
    defaults = llm.default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.95, 20)
    fim = llm.tokenizer.token_to_id("<|fim_prefix|>")
    assert fim not in llm.tokenizer.special_token_ids and 151645 in llm.tokenizer.special_token_ids


def test_writing_refuses_what_llama_cpp_would_run_differently(tmp_path, source):
    for overrides, match in (({"attention_bias": True}, "attention biases"),):
        hf = make_hf_checkpoint(tmp_path / "bias", **overrides)
        with pytest.raises(ValueError, match=match):
            save_gguf(load_model(hf, progress=False), source[1], tmp_path / "x.gguf", progress=False)
    moe = make_hf_checkpoint(tmp_path / "moe", moe=True, norm_topk_prob=False)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        save_gguf(load_model(moe, progress=False), source[1], tmp_path / "y.gguf", progress=False)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    hf = make_hf_checkpoint(tmp_path / "yarn", vocab_size=151936, num_hidden_layers=1, rope_scaling=yarn)
    model = load_model(hf, dtype="float32", progress=False)
    path = save_gguf(model, source[1], tmp_path / "yarn.gguf", "f32", progress=False)
    assert GGUFCheckpoint(path).config().rope_scaling == model.config.rope_scaling
