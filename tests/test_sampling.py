"""The sampler's filters, penalties, seeds and parameter validation."""

from __future__ import annotations

import pytest
import torch

from qwen3.sampling import Sampler, SampleRequest, SamplingError, SamplingParams


def rows(params: SamplingParams, n: int = 1, output=None, prompt=None, seed=None) -> list[SampleRequest]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return [SampleRequest(params, prompt or [], list(output or []), gen) for _ in range(n)]


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def draw(params: SamplingParams, trials: int = 400, logits=LOGITS) -> set[int]:
    sampler = Sampler()
    gen = torch.Generator().manual_seed(0)
    return {sampler(logits.clone(), [SampleRequest(params, [], [], gen)]).token_ids[0] for _ in range(trials)}


def test_greedy_is_argmax():
    assert Sampler()(LOGITS.clone(), rows(SamplingParams(temperature=0))).token_ids == [0]


def test_top_k_top_p_min_p_restrict_the_support():
    assert (
        draw(SamplingParams(temperature=1.0)) == {0, 1, 2, 3, 4, 5} - {5} or len(draw(SamplingParams())) >= 4
    )
    assert draw(SamplingParams(top_k=2)) == {0, 1}
    # probabilities: .55 .20 .12 .07 .03 .00 -> top_p 0.7 keeps the first two (.55 < .7 <= .75)
    assert draw(SamplingParams(top_p=0.7)) == {0, 1}
    assert draw(SamplingParams(top_p=0.5)) == {0}
    assert draw(SamplingParams(min_p=0.3)) == {0, 1}  # 0.2/0.55 >= 0.3, 0.12/0.55 < 0.3


def test_temperature_sharpens():
    sampler = Sampler()
    gen = torch.Generator().manual_seed(0)
    cold = [sampler(LOGITS.clone(), [SampleRequest(SamplingParams(temperature=0.1), [], [], gen)]).token_ids[0]
            for _ in range(200)]  # fmt: skip
    assert cold.count(0) >= 199


def test_penalties():
    logits = torch.zeros(1, 4)
    out = Sampler()(logits.clone(), rows(SamplingParams(temperature=0, presence_penalty=1.0), output=[0]))
    assert out.token_ids[0] != 0
    base = torch.tensor([[1.0, 0.9, -1.0]])
    freq = Sampler()(base.clone(), rows(SamplingParams(temperature=0, frequency_penalty=0.1), output=[0, 0]))
    assert freq.token_ids == [1]  # 1.0 - 0.2 < 0.9
    rep = Sampler()(base.clone(), rows(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=[0]))
    assert rep.token_ids == [1]  # 1.0 / 1.2 < 0.9


def test_seeded_rows_are_independent_of_batch_neighbours():
    params = SamplingParams(temperature=1.0, seed=5)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    alone = [Sampler()(logits.clone(), rows(params, seed=5)).token_ids[0]]
    gen = torch.Generator().manual_seed(5)
    other = SamplingParams(temperature=1.0)
    batch = [SampleRequest(other, [], []), SampleRequest(params, [], [], gen), SampleRequest(other, [], [])]
    together = Sampler()(logits.repeat(3, 1), batch).token_ids[1]
    assert alone == [together]


def test_logprobs_and_top_alternatives():
    out = Sampler()(LOGITS.clone(), rows(SamplingParams(temperature=0, logprobs=2)))
    chosen, top = out.logprobs[0]
    expected = LOGITS.log_softmax(-1)[0]
    assert chosen == pytest.approx(expected[0].item())
    assert [t for t, _ in top] == [0, 1]


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
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_generation_config_defaults(spec_dir):
    params = SamplingParams.from_generation_config(spec_dir / "hf_qwen3_0.6b", max_tokens=9)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.95, 20, 9)
