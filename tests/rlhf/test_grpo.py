"""GRPO on a verifiable toy task ("a+b=" -> the sum) from a random tiny model at TP=2: rollouts
come from the policy's own chunks through the generation engine, and mean reward rises."""


import pytest

from tests.launch import run_module
from tests.rlhf.logs import (
    COMMON,
    SUM_PROMPTS,
    TINY_LLAMA,
    check_clipping_and_throughput,
    logged,
    mean,
)

ITERS = 30


@pytest.mark.distributed
def test_grpo_raises_mean_reward_on_sums():
    out = run_module("rlhf.grpo", [
        *COMMON, *TINY_LLAMA,
        "--tensor-model-parallel-size", "2", "--train-data", str(SUM_PROMPTS),
        "--reward-fn", "rlhf.rewards:leading_number", "--max-new-tokens", "3",
        "--grpo-group-size", "8", "--grpo-kl-beta", "0.01", "--grpo-iterations", "2",
        "--grpo-clamp-eps-lower", "0.2", "--grpo-clamp-eps-upper", "0.2",
        "--micro-batch-size", "32", "--global-batch-size", "64", "--train-iters", str(ITERS),
        "--lr", "1e-2"], nproc=2).stdout
    rewards, kl = logged(out, "reward"), logged(out, "kl")
    assert sorted(rewards) == list(range(1, ITERS + 1)), out[-2000:]
    assert mean(rewards, range(1, 5)) < 0.05, rewards  # random bytes are rarely numbers
    assert mean(rewards, range(ITERS - 4, ITERS + 1)) > 0.15, rewards
    assert kl[1] == pytest.approx(0.0, abs=1e-6) and kl[ITERS] > 0  # reference = initial policy
    check_clipping_and_throughput(out, ITERS, "GRPO")
