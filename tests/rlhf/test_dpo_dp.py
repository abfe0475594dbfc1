"""DPO at DP=2 (reference-free, Qwen2 with tied embeddings): the first iteration's loss is the
mean over the whole global batch, equal to an independent computation from the HF model's
log-probabilities - the value a single rank computes on the same global batch."""

import math

import pytest
import transformers

from megatron_patch.tokenizer.byte import ByteTokenizer
from rlhf.data import PairRows, read_pairs
from tests.launch import run_module
from tests.rlhf.logs import COMMON, PREFERENCES, logged
from tests.rlhf.test_dpo import _answer_logprob

BETA, GBS, SEQ = 0.5, 8, 96


@pytest.mark.distributed
def test_dpo_loss_at_dp2_is_the_global_batch_mean(rlhf_models):
    hf_dir, checkpoint = rlhf_models["qwen2"]
    out = run_module("rlhf.dpo", [
        *COMMON, "--load", str(checkpoint), "--finetune", "--no-load-optim", "--no-load-rng",
        "--seq-length", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", str(GBS),
        "--train-iters", "1", "--lr", "1e-3", "--train-data", str(PREFERENCES),
        "--dpo-beta", str(BETA), "--dpo-reference-free"], nproc=2).stdout
    assert "data-parallel size: 2" in out, out[-3000:]
    losses = logged(out, "dpo loss")
    tokenizer = ByteTokenizer()
    pairs = read_pairs(PREFERENCES, tokenizer, SEQ, "fail")
    rows = PairRows(pairs, GBS, SEQ, tokenizer.pad, seed=1234)  # Megatron's --seed
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    expected = []
    for row in range(0, GBS, 2):  # both ranks' pairs: rows 0-3 on rank 0, 4-7 on rank 1
        prompt, chosen, rejected = pairs[rows.pair_index(row)]
        h = BETA * (_answer_logprob(model, prompt, chosen) - _answer_logprob(model, prompt,
                                                                              rejected))
        expected.append(-math.log(1 / (1 + math.exp(-h))))
    assert losses[1] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # each rank's half alone differs: the logged value is not one rank's mean
    halves = [sum(expected[:2]) / 2, sum(expected[2:]) / 2]
    assert all(abs(losses[1] - half) > 1e-4 for half in halves), (losses[1], halves)
