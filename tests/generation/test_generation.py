"""Generation and perplexity from converted checkpoints against Hugging Face, at TP/PP 1-2.

One torchrun launch of 2 gloo ranks runs every family at its layouts (``generation_worker``);
the references are computed with transformers on the original HF weights (``conftest``):
``generate`` (greedy, and stopping at an EOS token) per prompt, and the NLL of the same windows.
"""

import math

import pytest

from tests.generation.conftest import MAX_NEW_TOKENS, run_generation_worker

# Tiny cases of tests/conversion/tiny_models.py and the layouts each runs at: dense llama-style
# (llama3 with llama3 rope scaling; qwen3 with q/k norm; qwen2 with yarn rope, whose cos/sin
# are scaled), MoE, ALiBi, MLA. A family is one line.
RUNS = {
    "llama3": ["tp1", "tp2", "tp1-roll", "tp2-roll", "pp2"],
    "qwen2_yarn": ["tp1", "tp2-roll"],
    "qwen3": ["tp1", "tp2", "tp1-roll"],
    "qwen2_moe": ["tp1", "tp2"],
    "bloom": ["tp1", "tp2", "tp1-roll"],
    "deepseek_v2_lite": ["tp1", "tp2"],  # MLA caches rotated keys: append layout only
}
LAYOUTS = {  # name -> (tp, pp, cache layout, extra checks)
    "tp1": (1, 1, "append", ["eos", "sampling+"]),
    "tp2": (2, 1, "append", ["sampling"]),
    "tp1-roll": (1, 1, "roll", []),
    "tp2-roll": (2, 1, "roll", ["sampling"]),
    "pp2": (1, 2, "append", ["sampling"]),
}


def _ids(check: str | None = None) -> list[tuple[str, str]]:
    return [(case, f"{case}-{name}") for case, names in RUNS.items() for name in names
            if check is None or check in LAYOUTS[name][3]]


@pytest.fixture(scope="module")
def results(tiny_checkpoint, tmp_path_factory) -> dict[str, dict]:
    runs = [{"id": f"{case}-{name}", "mcore": str(tiny_checkpoint(case)[1]), "tp": tp,
             "pp": pp, "layout": layout, "checks": checks}
            for case, names in RUNS.items() for name in names
            for tp, pp, layout, checks in [LAYOUTS[name]]]
    return run_generation_worker(runs, tmp_path_factory.mktemp("generation-runs"), nproc=2)


@pytest.mark.distributed
@pytest.mark.parametrize("case, run", _ids())
def test_greedy_generation_equals_hf_generate(results, hf_reference, case, run):
    """Token for token, left-padded batches, at TP=1/2, PP=2, both cache layouts."""
    expected = hf_reference.generate(case, None)
    assert all(len(tokens) == MAX_NEW_TOKENS for tokens in expected)
    assert results[run]["greedy"] == expected


@pytest.mark.distributed
@pytest.mark.parametrize("case, run", _ids("eos"))
def test_stops_at_eos_like_hf_generate(results, hf_reference, case, run):
    eos = results[run]["eos"]
    expected = hf_reference.generate(case, eos)
    assert results[run]["eos_stopped"] == expected
    assert results[run]["eos_reasons"] == ["stop" if t[-1] == eos else "length" for t in expected]
    assert results[run]["eos_reasons"][0] == "stop"


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(RUNS))
def test_seeded_sampling_is_reproducible(results, case):
    """Same seed: the same samples again, at batch size 1, and at every layout that samples;
    another seed: other samples."""
    reference = results[f"{case}-tp1"]
    assert reference["sampled_again"] == reference["sampled"]
    assert reference["sampled_batch1"] == reference["sampled"]
    others = [results[run] for c, run in _ids("sampling") if c == case]
    assert others and all(r["sampled"] == reference["sampled"] for r in others)
    assert reference["sampled_seed8"] != reference["sampled"]
    assert reference["sampled"] != reference["greedy"]


@pytest.mark.distributed
@pytest.mark.parametrize("case, run", _ids())
def test_perplexity_equals_hf(results, hf_reference, case, run):
    """eval-ppl's NLL sum and token count equal HF's on the same windows."""
    total, count = hf_reference.nll(case)
    nll, tokens = results[run]["nll"]
    assert tokens == count
    assert math.isclose(math.exp(nll / tokens), math.exp(total / count), rel_tol=1e-5)
