"""config.json parsing: both dialects, every released size, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3.config import ConfigError, Qwen3Config
from qwen3.layers import rope_inverse_frequencies


def test_official_0_6b_config(spec_dir):
    config = Qwen3Config.from_file(spec_dir / "hf_qwen3_0.6b" / "config.json")
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (1024, 16, 8)
    assert config.head_dim == 128  # read from the config, not 1024 / 16
    assert config.rope_theta == 1_000_000 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.torch_dtype == torch.bfloat16
    assert not config.is_moe and config.architecture == "Qwen3ForCausalLM"


def test_every_released_size_parses(spec_dir):
    models = json.loads((spec_dir / "qwen3_configs.json").read_text())["models"]
    for name, entry in models.items():
        config = Qwen3Config.from_dict(entry["config.json"])
        assert config.head_dim == 128, name
        assert config.is_moe == ("A" in name.split("-")[-1]), name
        if config.is_moe:
            assert config.num_experts == 128 and config.num_experts_per_tok == 8 and config.norm_topk_prob
            assert all(config.is_sparse_layer(i) for i in range(config.num_hidden_layers))


def test_yarn_recipe_of_the_docs(spec_dir):
    raw = json.loads((spec_dir / "hf_qwen3_0.6b" / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    config = Qwen3Config.from_dict(raw)
    inv_freq, scale = rope_inverse_frequencies(config)
    assert scale == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1.0)
    plain, _ = rope_inverse_frequencies(Qwen3Config.from_dict({**raw, "rope_scaling": None}))
    assert inv_freq[0] == plain[0]  # high frequencies extrapolate unchanged
    assert inv_freq[-1] == pytest.approx(plain[-1] / 4.0)  # low frequencies interpolate by the factor


def test_transformers_5_dialect_equals_official():
    official = {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128},
        "torch_dtype": "bfloat16",
    }
    v5 = {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 128,
            "rope_theta": 1e6,
        },
        "dtype": "bfloat16",
    }
    a, b = Qwen3Config.from_dict(official), Qwen3Config.from_dict(v5)
    assert a == b
    assert a.num_experts == 8 and a.rope_theta == 1e6 and a.rope_scaling["rope_type"] == "yarn"
    assert a.head_dim == 16  # absent: hidden_size / heads, as transformers does


def test_round_trip_through_to_dict():
    config = Qwen3Config.from_dict(
        {
            "model_type": "qwen3",
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "torch_dtype": "float16",
        }
    )
    again = Qwen3Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model_type": "llama"}, "not a Qwen3 model"),
        ({"model_type": "qwen3", "architectures": ["Qwen2ForCausalLM"]}, "do not match"),
        ({"model_type": "qwen3", "num_attention_heads": 6, "num_key_value_heads": 4}, "multiple"),
        ({"model_type": "qwen3", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "not supported"),
        ({"model_type": "qwen3", "use_sliding_window": True}, "sliding"),
        ({"model_type": "qwen3", "torch_dtype": "int8"}, "dtype"),
    ],
)
def test_bad_configs(raw, message):
    with pytest.raises(ConfigError, match=message):
        Qwen3Config.from_dict(raw)


MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_size": 10**12}, "vocab_size must be an integer in"),
        ({"num_hidden_layers": 10**6}, "num_hidden_layers must be an integer in"),
        ({"head_dim": 0}, "head_dim must be an integer in"),
        ({"hidden_size": "1024"}, "hidden_size must be an integer"),
        ({"num_attention_heads": None}, "num_attention_heads must be an integer"),
        ({"intermediate_size": 3.5}, "intermediate_size must be an integer"),
        ({"num_key_value_heads": True}, "num_key_value_heads must be an integer"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a number in"),
        ({"rope_theta": -1}, "rope_theta must be a number"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"eos_token_id": "151645"}, "eos_token_id must be a token id"),
        ({"eos_token_id": [151645, 10**9]}, "eos_token_id must be a token id"),
        ({"bos_token_id": 200000}, "outside the vocabulary"),
        ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "rope_scaling.factor"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 0}}, "original"),
        ({"mlp_only_layers": "all"}, "mlp_only_layers must be a list"),
        ({**MOE, "num_experts": 8, "mlp_only_layers": [99]}, "outside"),
        ({**MOE, "num_experts": -1}, "num_experts must be an integer"),
        ({**MOE, "num_local_experts": "8"}, "num_experts must be an integer"),
        ({"architectures": "Qwen3ForCausalLM"}, "do not match"),
    ],
)  # fmt: skip
def test_every_field_is_checked_before_anything_is_built(spec_dir, change, message):
    raw = {**json.loads((spec_dir / "hf_qwen3_0.6b" / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=message):
        Qwen3Config.from_dict(raw)


def test_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="config.json: config.json must hold a JSON object"):
        Qwen3Config.from_file(tmp_path / "config.json")


def test_num_parameters_is_what_the_model_holds(spec_dir):
    import torch

    from qwen3.model import model_class

    released = json.loads((spec_dir / "qwen3_configs.json").read_text())["models"]
    for name in ("Qwen3-0.6B", "Qwen3-30B-A3B"):
        config = Qwen3Config.from_dict(released[name]["config.json"])
        with torch.device("meta"):
            model = model_class(config)(config)
        assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_random_mutations_load_or_fail_with_config_error(spec_dir):
    """Property: any field set to any JSON value either builds a config or raises ConfigError."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    base = json.loads((spec_dir / "hf_qwen3_0.6b" / "config.json").read_text())
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False)
        | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=6,
    )
    fields = [*base, "rope_parameters", "num_local_experts", "num_experts", "mlp_only_layers", "dtype"]

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(
        st.dictionaries(st.sampled_from(fields), json_values, min_size=1, max_size=3), st.booleans()
    )
    def check(changes, moe):
        raw = {**base, **(MOE if moe else {})}
        raw.update(changes)
        try:
            config = Qwen3Config.from_dict(raw)
        except ConfigError:
            return
        assert config.num_parameters() > 0 and config.head_dim % 2 == 0

    check()


def test_decode_parameters_are_the_activated_ones(spec_dir):
    """Qwen's model card: 30.5B total / 3.3B activated, 235B / 22B (counting the embedding table, of which
    a decode step reads one row); a dense model reads everything but that table, a tied one everything."""
    released = json.loads((spec_dir / "qwen3_configs.json").read_text())["models"]
    for name, activated in (("Qwen3-30B-A3B", 3.3e9), ("Qwen3-235B-A22B", 22e9), ("Qwen3-8B", None)):
        config = Qwen3Config.from_dict(released[name]["config.json"])
        table = config.vocab_size * config.hidden_size
        expected = (activated or config.num_parameters()) - table
        assert abs(config.decode_parameters() - expected) / expected < 0.02, name
    tied = Qwen3Config.from_dict(released["Qwen3-0.6B"]["config.json"])
    assert tied.decode_parameters() == tied.num_parameters()
