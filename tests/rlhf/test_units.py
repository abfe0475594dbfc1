"""RLHF building blocks against direct transcriptions of the papers' formulas: DPO and its
variants, Bradley-Terry, GRPO advantages and clipping, GAE, rewards, preference encoding."""

import math

import pytest
import torch

from megatron_patch.tokenizer.byte import ByteTokenizer
from rlhf.data import encode_pair, sequence_rows
from rlhf.losses import (
    bradley_terry_loss,
    clipped_policy_loss,
    dpo_loss,
    gae,
    group_advantages,
    kl_k3,
)
from rlhf.rewards import exact_match, leading_number, load_reward_fn


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_variants_match_their_formulas():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -9.0], [-5.0, -4.0], [-4.0, -8.5],
                                               [-4.5, -4.2]))
    beta = 0.3
    for eps in (0.0, 0.2):
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        for i in range(2):
            h = (pc[i] - rc[i]) - (pr[i] - rr[i])
            expected = (-(1 - eps) * math.log(_sigmoid(beta * h))
                        - eps * math.log(_sigmoid(-beta * h)))
            assert losses[i].item() == pytest.approx(expected, rel=1e-6)
            assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
            assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(ipo, (h - 1 / (2 * beta)) ** 2)
    free, chosen, _ = dpo_loss(pc, pr, None, None, beta=beta)
    assert torch.allclose(free, -torch.log(torch.sigmoid(beta * (pc - pr))))
    assert torch.allclose(chosen, beta * pc)
    with pytest.raises(ValueError, match="loss type"):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge-typo")


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc = torch.tensor([-4.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1)[0].sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending raises chosen, lowers rejected


def test_bradley_terry():
    loss = bradley_terry_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]))
    expected = [-math.log(_sigmoid(1.5)), -math.log(_sigmoid(-2.0))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)


def test_group_advantages_standardise_within_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # unbiased
    unit = 0.5 / (std + 1e-4)
    assert adv[:4].tolist() == pytest.approx([unit, -unit, -unit, unit])
    assert adv[4:].tolist() == [0.0] * 4  # a group with equal rewards teaches nothing
    assert group_advantages(rewards, 4, scale=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_clipped_policy_loss_and_kl():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([0.5, 1.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_policy_loss(new, old, adv, 0.2, 0.28)
    # min(r A, clip(r) A): r=0.5,A=1 -> 0.5; r=1.5,A=1 -> 1.28; r=1.5,A=-1 -> -1.5; r=.5,A=-1 -> -.8
    assert (-loss).tolist() == pytest.approx([0.5, 1.28, -1.5, -0.8])
    assert clipped.tolist() == [0.0, 1.0, 0.0, 1.0]
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert kl_k3(logp, ref).tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, 0.0])


def test_gae_matches_the_recursion():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    gamma, lam = 0.9, 0.8
    adv, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        span = mask[row].nonzero().flatten().tolist()
        running = 0.0
        for t in reversed(span):
            after = values[row, t + 1].item() if t + 1 in span else 0.0
            delta = rewards[row, t].item() + gamma * after - values[row, t].item()
            running = delta + gamma * lam * running
            assert adv[row, t].item() == pytest.approx(running, rel=1e-5, abs=1e-6)
        outside = [t for t in range(6) if t not in span]
        assert all(adv[row, t] == 0 and returns[row, t] == 0 for t in outside)
    assert torch.allclose(returns, (adv + values) * mask)


def test_rewards():
    records = [{"answer": "7"}, {"answer": "12"}, {"answer": "3"}, {"answer": "#### 1,234"}]
    completions = ["7", "12 apples", "x3", "so the total is\n#### 1,234"]
    assert leading_number([""] * 4, completions, records) == [1.0, 0.2, 0.0, 0.0]
    assert exact_match([""] * 4, completions, records) == [1.0, 1.0, 1.0, 1.0]
    assert exact_match([""], ["it is 8"], [{"answer": "7"}]) == [0.0]
    assert load_reward_fn("rlhf.rewards:leading_number") is leading_number
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("leading_number")


def test_preference_encoding_plain_and_chat():
    tok = ByteTokenizer()
    prompt, chosen, rejected = encode_pair(tok, {"prompt": "Q ", "chosen": "yes",
                                                 "rejected": "no"})
    assert (prompt, chosen, rejected) == ([81, 32], [121, 101, 115, 256], [110, 111, 256])
    user = [{"role": "user", "content": "hi"}]
    forms = [{"prompt": user, "chosen": "hello", "rejected": "go"},
             {"chosen": user + [{"role": "assistant", "content": "hello"}],
              "rejected": user + [{"role": "assistant", "content": "go"}]}]
    encoded = [encode_pair(tok, record) for record in forms]
    assert encoded[0] == encoded[1]
    chatml_prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.detokenize(encoded[0][0]) == chatml_prompt
    assert tok.detokenize(encoded[0][1]) == "hello<|im_end|>"
    rows = sequence_rows([[1, 2, 3]], [[4, 5]], 8, 0)
    assert rows["tokens"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert rows["labels"].tolist() == [[2, 3, 4, 5, 0, 0, 0, 0]]
    assert rows["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0]]  # labels 4 and 5
    assert rows["last"].tolist() == [4]


def test_launcher_composes_each_stage(monkeypatch, tmp_path):
    from rlhf.launch import compose

    monkeypatch.setenv("SAVE", "none")
    for stage, module in (("rm", "rlhf.reward_model"), ("dpo", "rlhf.dpo"),
                          ("grpo", "rlhf.grpo"), ("ppo", "rlhf.ppo")):
        command = compose("qwen3", stage, ["--dpo-beta", "0.3"])
        assert command[command.index("-m", 3) + 1] == module
        assert "--save" not in command and command[-2:] == ["--dpo-beta", "0.3"]
        assert command[command.index("--model-family") + 1] == "qwen3"
    monkeypatch.setenv("LOAD", str(tmp_path))  # a checkpoint without tokenizer files
    with pytest.raises(SystemExit, match="TOKENIZER_TYPE"):
        compose("llama", "dpo", [])
    monkeypatch.setenv("TOKENIZER_TYPE", "ByteTokenizer")
    monkeypatch.setenv("REF_LOAD", "/ckpt/ref")
    command = compose("llama", "dpo", [])
    assert command[command.index("--load") + 1] == str(tmp_path) and "--finetune" in command
    assert command[command.index("--ref-load") + 1] == "/ckpt/ref"
