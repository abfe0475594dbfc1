"""Logits processing equals transformers' processors; sampling follows the probabilities."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from megatron_patch.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    row_generators,
    select_tokens,
)

VOCAB = 50


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_hf(penalty):
    logits = _logits()
    history = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(6, VOCAB, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, penalty), expected)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.9), (0.7, 10, 1.0), (1.3, 5, 0.6), (0.5, 0, 0.3), (1.0, 1, 1.0), (2.0, 40, 0.95),
])
def test_filters_equal_hf_warpers(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, with HF's semantics (e.g. its top-p boundary)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    for seed in range(5):
        logits = _logits(seed)
        expected = warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone())
        got = filter_logits(logits, SamplingParams(temperature=temperature, top_k=top_k,
                                                   top_p=top_p))
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_greedy_and_sampling():
    logits = _logits()
    assert torch.equal(select_tokens(logits, SamplingParams(greedy=True), None, None),
                       logits.argmax(-1))
    assert SamplingParams(temperature=0).is_greedy
    # top-k 1 leaves one token to sample
    params = SamplingParams(top_k=1, seed=3)
    assert torch.equal(select_tokens(logits, params, None, row_generators(3, range(6), "cpu")),
                       logits.argmax(-1))


def test_samples_follow_the_distribution_and_the_seed():
    """Frequencies of 20000 draws match softmax(logits / T); the row's seed decides them."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.8)

    def draws(seed: int, count: int) -> list[int]:
        generators = row_generators(seed, [0], "cpu")
        return [int(select_tokens(logits, params, None, generators)) for _ in range(count)]

    rows = 20000  # one draw per row, each from its own generator
    sampled = select_tokens(logits.expand(rows, -1), params, None,
                            row_generators(11, range(rows), "cpu"))
    counts = torch.bincount(sampled, minlength=4)
    assert torch.allclose(counts / rows, (logits[0] / 0.8).softmax(-1), atol=0.015)
    assert draws(11, 50) == draws(11, 50)
    assert draws(11, 50) != draws(12, 50)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0.0},
                                 {"top_p": 1.5}, {"repetition_penalty": 0}])
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
