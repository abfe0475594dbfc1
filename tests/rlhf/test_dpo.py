"""DPO at TP=2 (padded vocabulary): the first iteration's loss and implicit rewards equal an
independent computation from the HF models' log-probabilities on the same pairs, and training
grows the implicit reward margin."""

import math

import pytest
import torch
import transformers

from megatron_patch.tokenizer.byte import ByteTokenizer
from rlhf.data import PairRows, read_pairs
from tests.launch import run_module
from tests.rlhf.logs import COMMON, PREFERENCES, logged, mean

BETA, SMOOTHING, GBS, SEQ, ITERS = 0.5, 0.0, 8, 96, 15


def _answer_logprob(model, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = model(ids).logits[0].double().log_softmax(-1)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))


@pytest.mark.distributed
def test_dpo_matches_hf_logprobs_and_margin_grows(rlhf_models):
    (policy_hf, policy), (reference_hf, reference) = rlhf_models["policy"], rlhf_models["reference"]
    result = run_module("rlhf.dpo", [
        *COMMON, "--load", str(policy), "--ref-load", str(reference), "--finetune",
        "--no-load-optim", "--no-load-rng", "--tensor-model-parallel-size", "2",
        "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", str(GBS),
        "--train-iters", str(ITERS), "--lr", "2e-3", "--train-data", str(PREFERENCES),
        "--dpo-beta", str(BETA), "--dpo-label-smoothing", str(SMOOTHING)], nproc=2)
    out = result.stdout
    losses, margins = logged(out, "dpo loss"), logged(out, "reward margin")
    chosen_logged, rejected_logged = logged(out, "chosen reward"), logged(out, "rejected reward")
    assert sorted(losses) == list(range(1, ITERS + 1)), out[-2000:]

    # the first global batch, scored by the HF models (the weights the checkpoints came from)
    tokenizer = ByteTokenizer()
    pairs = read_pairs(PREFERENCES, tokenizer, SEQ, "fail")
    rows = PairRows(pairs, ITERS * GBS, SEQ, tokenizer.pad, seed=1234)  # Megatron's --seed
    models = [transformers.AutoModelForCausalLM.from_pretrained(d).eval()
              for d in (policy_hf, reference_hf)]
    expected_loss = expected_chosen = expected_rejected = 0.0
    for row in range(0, GBS, 2):
        prompt, chosen, rejected = pairs[rows.pair_index(row)]
        pc, rc = (_answer_logprob(m, prompt, chosen) for m in models)
        pr, rr = (_answer_logprob(m, prompt, rejected) for m in models)
        h = BETA * ((pc - rc) - (pr - rr))
        expected_loss += (-(1 - SMOOTHING) * math.log(1 / (1 + math.exp(-h)))
                          - SMOOTHING * math.log(1 / (1 + math.exp(h))))
        expected_chosen += BETA * (pc - rc)
        expected_rejected += BETA * (pr - rr)
    pairs_per_batch = GBS // 2
    assert losses[1] == pytest.approx(expected_loss / pairs_per_batch, rel=1e-5)
    assert chosen_logged[1] == pytest.approx(expected_chosen / pairs_per_batch, rel=1e-5)
    assert rejected_logged[1] == pytest.approx(expected_rejected / pairs_per_batch, rel=1e-5)

    first, last = range(1, 4), range(ITERS - 2, ITERS + 1)
    assert mean(margins, last) > mean(margins, first) + 1.0, margins
    assert mean(losses, last) < mean(losses, first) - 0.1, losses
    assert mean(logged(out, "reward accuracy"), last) >= 0.9
