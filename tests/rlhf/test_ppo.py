"""PPO with a critic: the clipped value loss against its formula; on the toy sum task ("a+b=")
at TP=2 mean reward rises and the critic's value loss falls; at PP=2 the critic starts from a
reward-model checkpoint, which also scores the rollouts."""


import pytest
import torch

from rlhf.losses import clipped_value_loss, gae, ppo_token_rewards
from tests.launch import run_module
from tests.rlhf.logs import (
    COMMON,
    PREFERENCES,
    SUM_PROMPTS,
    TINY_LLAMA,
    check_clipping_and_throughput,
    logged,
    mean,
)

ITERS = 30
PPO = ["--max-new-tokens", "3", "--grpo-iterations", "2", "--grpo-clamp-eps-lower", "0.2",
       "--grpo-clamp-eps-upper", "0.2", "--ppo-kl-coef", "0.01", "--train-data", str(SUM_PROMPTS)]


def test_clipped_value_loss_matches_its_formula():
    values = torch.tensor([[0.5, -0.3, 1.2, 0.0]])
    old = torch.tensor([[0.1, 0.0, 1.0, 0.4]])
    returns = torch.tensor([[1.0, -1.0, 0.0, 0.4]])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    for t in range(4):
        v, o, r = values[0, t].item(), old[0, t].item(), returns[0, t].item()
        v_clip = o + min(max(v - o, -0.2), 0.2)
        expected = 0.5 * max((v - r) ** 2, (v_clip - r) ** 2)
        assert loss[0, t].item() == pytest.approx(expected, rel=1e-6)
        assert clipped[0, t].item() == float((v_clip - r) ** 2 > (v - r) ** 2)
    # token 0 moved 0.4 towards its return: the clipped term (0.3 from it) rules
    assert clipped[0, 0] == 1 and loss[0, 0].item() == pytest.approx(0.5 * 0.7 ** 2)
    # within the clip range the loss is the plain squared error, with its gradient
    inside = torch.tensor([[0.15]], requires_grad=True)
    loss, _ = clipped_value_loss(inside, torch.tensor([[0.1]]), torch.tensor([[1.0]]), clip=0.2)
    loss.sum().backward()
    assert inside.grad.item() == pytest.approx(0.15 - 1.0)


def test_token_rewards_and_returns():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)
    log_ratio = torch.tensor([[9.0, 0.5, -0.2, 0.1, 9.0], [9.0, 9.0, 0.3, 9.0, 9.0]])
    rewards = ppo_token_rewards(torch.tensor([2.0, -1.0]), log_ratio, mask, kl_coef=0.1)
    expected = torch.tensor([[0, -0.05, 0.02, 2 - 0.01, 0], [0, 0, -1 - 0.03, 0, 0]])
    assert torch.allclose(rewards, expected)
    # gamma = lambda = 1 and zero values: each token's return is the sum of the rewards after it
    _, returns = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    assert torch.allclose(returns[0, 1:4], torch.tensor([1.96, 2.01, 1.99]))
    assert torch.allclose(returns[1], expected[1])


@pytest.mark.distributed
def test_ppo_raises_mean_reward_and_fits_the_critic():
    # rewards in [-1, 1]: a zero-initialised critic starts ~1 away from the returns
    out = run_module("rlhf.ppo", [
        *COMMON, *TINY_LLAMA, *PPO, "--tensor-model-parallel-size", "2",
        "--reward-fn", "tests.rlhf.logs:signed_leading_number", "--grpo-group-size", "1",
        "--micro-batch-size", "32", "--global-batch-size", "64", "--train-iters", str(ITERS),
        "--lr", "1e-2", "--critic-lr", "1e-2"], nproc=2).stdout
    assert "> critic: the initial policy with a zero value head" in out
    rewards, values, kl = logged(out, "reward"), logged(out, "value loss"), logged(out, "kl")
    assert sorted(rewards) == sorted(values) == list(range(1, ITERS + 1)), out[-2000:]
    first, last = range(1, 5), range(ITERS - 4, ITERS + 1)
    assert mean(rewards, first) < -0.9, rewards  # random bytes are rarely numbers
    assert mean(rewards, last) > mean(rewards, first) + 0.12, rewards
    assert mean(values, range(1, 3)) > 0.2, values  # zero values against returns near -1
    assert mean(values, last) < 0.05, values
    assert kl[1] == pytest.approx(0.0, abs=1e-6) and kl[ITERS] > 0  # reference = initial policy
    check_clipping_and_throughput(out, ITERS, "PPO")


@pytest.mark.distributed
def test_ppo_critic_from_reward_model_at_pp2(rlhf_models, tmp_path):
    policy = rlhf_models["policy"][1]
    run_module("rlhf.reward_model", [
        *COMMON, "--load", str(policy), "--finetune", "--no-load-optim", "--no-load-rng",
        "--save", str(tmp_path / "rm"), "--save-interval", "1000", "--seq-length", "96",
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "1",
        "--lr", "1e-3", "--train-data", str(PREFERENCES)], nproc=2)
    iterations = 4
    out = run_module("rlhf.ppo", [
        *COMMON, *PPO, "--load", str(policy), "--finetune", "--no-load-optim", "--no-load-rng",
        "--pipeline-model-parallel-size", "2", "--seq-length", "16",
        "--reward-model", str(tmp_path / "rm"), "--reward-fn", "none",
        "--grpo-group-size", "2", "--micro-batch-size", "4", "--global-batch-size", "16",
        "--train-iters", str(iterations), "--lr", "1e-3"], nproc=2).stdout
    assert f"> critic: {tmp_path / 'rm'}" in out
    values, rewards = logged(out, "value loss"), logged(out, "reward")
    assert sorted(values) == sorted(rewards) == list(range(1, iterations + 1)), out[-2000:]
    # reward-model scores are not the rule-based 0/0.2/1: the reward model scored the rollouts
    assert all(0 < values[i] < 100 for i in values) and len(set(rewards.values())) > 1


@pytest.mark.distributed
def test_ppo_resume_continues_the_critic(rlhf_models, tmp_path):
    """A run stopped after its iteration-2 checkpoint and resumed logs iterations 3-4 exactly as
    the uninterrupted run: the critic (weights and optimizer) is saved with the policy."""
    hf_policy, policy = map(str, rlhf_models["policy"])
    flags = [*COMMON, *PPO, "--reward-fn", "tests.rlhf.logs:signed_leading_number",
             "--seq-length", "16", "--grpo-group-size", "1", "--micro-batch-size", "8",
             "--global-batch-size", "8", "--lr", "1e-2", "--critic-lr", "1e-2",
             "--save-interval", "2"]
    start = ["--load", policy, "--finetune", "--no-load-optim", "--no-load-rng"]
    full = run_module("rlhf.ppo", [*flags, *start, "--train-iters", "4",
                                   "--save", str(tmp_path / "full")]).stdout
    run_module("rlhf.ppo", [*flags, *start, "--train-iters", "4", "--exit-interval", "2",
                            "--save", str(tmp_path / "run")])
    assert (tmp_path / "run" / "critic" / "iter_0000002").is_dir()
    # a training checkpoint has no conversion metadata: the architecture comes from the HF config
    resume = [*flags, "--train-iters", "4", "--load", str(tmp_path / "run"),
              "--save", str(tmp_path / "run"), "--hf-config-path", hf_policy,
              "--make-vocab-size-divisible-by", "2"]
    with pytest.raises(AssertionError, match="pass --ref-load"):  # --load is the trained policy
        run_module("rlhf.ppo", resume)
    resumed = run_module("rlhf.ppo", [*resume, "--ref-load", policy]).stdout
    assert "(iteration 2)" in resumed
    for key in ("value loss", "ppo loss", "reward", "kl"):
        expected = logged(full, key)
        assert logged(resumed, key) == {3: expected[3], 4: expected[4]}, key
