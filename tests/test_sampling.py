"""The sampler's filters, penalties, seeds and parameter validation."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3.engine.input_batch import InputBatch
from qwen3.engine.sequence import Sequence
from qwen3.sampling import Sampler, SamplingError, SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], outputs=None, prompts=None, seeds=None):
    """Sample one token per row through the engine's own path: an InputBatch row per sequence."""
    n = len(params)
    batch = InputBatch(max_num_seqs=n, max_blocks_per_seq=4, vocab_size=logits.shape[-1], device="cpu")
    seqs = []
    for i, p in enumerate(params):
        prompt = list((prompts or [None] * n)[i] or [0])
        seq = Sequence(f"s{i}", prompt + list((outputs or [None] * n)[i] or []), len(prompt), p)
        seed = (seeds or [None] * n)[i]
        seq.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        batch.add(seq)
        seqs.append(seq)
    return Sampler()(logits, batch.sampling_batch(seqs))


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def draw(params: SamplingParams, trials: int = 400, logits=LOGITS) -> set[int]:
    """The tokens seen over ``trials`` seeded draws."""
    return {sample(logits, [params], seeds=[seed]).token_ids[0] for seed in range(trials)}


def test_greedy_is_argmax():
    assert sample(LOGITS, [SamplingParams(temperature=0)]).token_ids == [0]


def test_top_k_top_p_min_p_restrict_the_support():
    assert draw(SamplingParams(temperature=1.0)) >= {0, 1, 2, 3}
    assert draw(SamplingParams(top_k=2)) == {0, 1}
    # probabilities: .55 .20 .12 .07 .03 .00 -> top_p 0.7 keeps the first two (.55 < .7 <= .75)
    assert draw(SamplingParams(top_p=0.7)) == {0, 1}
    assert draw(SamplingParams(top_p=0.5)) == {0}
    assert draw(SamplingParams(min_p=0.3)) == {0, 1}  # 0.2/0.55 >= 0.3, 0.12/0.55 < 0.3
    assert draw(SamplingParams(top_k=3, top_p=0.8)) == {0, 1}  # top-p over the top-3's renormalised probs
    assert draw(SamplingParams(top_k=4, min_p=0.2)) == {0, 1, 2}


def test_topk_rows_with_different_k_in_one_batch():
    logits = LOGITS.repeat(3, 1)
    params = [SamplingParams(top_k=1), SamplingParams(top_k=2), SamplingParams(top_p=0.5)]
    seen = [set(), set(), set()]
    for seed in range(200):
        out = sample(logits, params, seeds=[seed, seed + 1, seed + 2])
        for i, t in enumerate(out.token_ids):
            seen[i].add(t)
    assert seen == [{0}, {0, 1}, {0}]


def test_temperature_sharpens():
    cold = [sample(LOGITS, [SamplingParams(temperature=0.1)], seeds=[s]).token_ids[0] for s in range(200)]
    assert cold.count(0) >= 199


def test_penalties():
    logits = torch.zeros(1, 4)
    out = sample(logits, [SamplingParams(temperature=0, presence_penalty=1.0)], outputs=[[0]])
    assert out.token_ids[0] != 0
    base = torch.tensor([[1.0, 0.9, -1.0]])
    freq = sample(base, [SamplingParams(temperature=0, frequency_penalty=0.1)], outputs=[[0, 0]])
    assert freq.token_ids == [1]  # 1.0 - 0.2 < 0.9
    rep = sample(base, [SamplingParams(temperature=0, repetition_penalty=1.2)], prompts=[[0]])
    assert rep.token_ids == [1]  # 1.0 / 1.2 < 0.9
    # presence only counts the output; the prompt alone does not trigger it
    assert sample(base, [SamplingParams(temperature=0, presence_penalty=2.0)], prompts=[[0]]).token_ids == [0]


def test_penalty_counts_are_kept_incrementally():
    batch = InputBatch(max_num_seqs=2, max_blocks_per_seq=4, vocab_size=5, device="cpu")
    seq = Sequence("s", [1, 2, 3, 3], 2, SamplingParams(frequency_penalty=0.5))
    batch.add(seq)
    assert batch.output_counts[batch.row_of[seq]].tolist() == [0, 0, 0, 2, 0]
    assert batch.prompt_mask[batch.row_of[seq]].tolist() == [False, True, True, False, False]
    batch.record([seq], [[4, 3]])
    assert batch.output_counts[batch.row_of[seq]].tolist() == [0, 0, 0, 3, 1]
    plain = Sequence("p", [1], 1, SamplingParams())
    batch.add(plain)
    batch.record([plain], [[4]])  # rows without penalties are not counted
    assert batch.output_counts.sum().item() == 4


def test_seeded_rows_are_independent_of_batch_neighbours():
    params = SamplingParams(temperature=1.0, seed=5)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    alone = sample(logits, [params], seeds=[5]).token_ids
    other = SamplingParams(temperature=1.0, top_k=7)
    together = sample(logits.repeat(3, 1), [other, params, other], seeds=[None, 5, None]).token_ids[1]
    assert alone == [together]


def test_logprobs_and_top_alternatives():
    out = sample(LOGITS, [SamplingParams(temperature=0, logprobs=2)])
    chosen, top = out.logprobs[0]
    expected = LOGITS.log_softmax(-1)[0]
    assert chosen == pytest.approx(expected[0].item())
    assert [t for t, _ in top] == [0, 1]


def test_the_sampler_never_sorts_the_vocabulary_for_top_k(monkeypatch):
    calls = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(
        torch.Tensor, "sort", lambda self, *a, **k: calls.append(self.shape) or real_sort(self, *a, **k)
    )
    logits = torch.randn(4, 151936)
    sample(logits, [SamplingParams(temperature=0.6, top_p=0.95, top_k=20)] * 4, seeds=[1, 2, 3, 4])
    assert calls == []
    sample(logits[:1], [SamplingParams(temperature=0.6, top_p=0.95)], seeds=[1])
    assert calls == [torch.Size([1, 151936])]  # top-k off and top-p on: one sort, of that row only


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 50}, "logprobs"),
        ({"max_tokens": True}, "max_tokens"),
        ({"top_k": 2.0}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": "0.5"}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": ["x" * 513]}, "stop"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"repetition_penalty": 1e9}, "repetition_penalty"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_generation_config_defaults(spec_dir):
    params = SamplingParams.from_generation_config(
        json.loads((spec_dir / "hf_qwen3_0.6b" / "generation_config.json").read_text()), max_tokens=9
    )
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.95, 20, 9)


def test_choice_seeds_wrap_into_the_seed_range():
    assert SamplingParams(seed=10, n=3).for_choice(2).seed == 12
    top = SamplingParams(seed=2**64 - 1, n=4)
    seeds = [top.for_choice(i).seed for i in range(4)]
    assert seeds == [2**64 - 1, -(2**63), -(2**63) + 1, -(2**63) + 2]
    for seed in seeds:
        torch.Generator().manual_seed(seed)  # every one is a seed torch accepts
    assert SamplingParams(n=2).for_choice(1).seed is None and SamplingParams(n=2).for_choice(1).n == 1


def test_any_parameters_are_valid_or_a_sampling_error():
    """Property: whatever values arrive, SamplingParams either accepts them or names the field."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    value = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=3)
        | st.lists(st.text(max_size=3) | st.integers(), max_size=3)
    )  # fmt: skip
    names = [
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "max_tokens", "stop", "stop_token_ids", "seed", "logprobs", "n", "ignore_eos",
    ]  # fmt: skip

    @hypothesis.settings(max_examples=500, deadline=None)
    @hypothesis.given(st.dictionaries(st.sampled_from(names), value, max_size=4))
    def check(kwargs):
        try:
            params = SamplingParams(**kwargs)
        except SamplingError as exc:
            assert exc.field in names
            return
        params.for_choice(3)
        assert params.temperature >= 0 and 0 < params.top_p <= 1

    check()
