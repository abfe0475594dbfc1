"""Reward model: Bradley-Terry training at PP=2 raises accuracy and lowers the loss; the
exported ``*ForSequenceClassification`` scores exactly like the trained model (llama trained;
qwen2/qwen3 after one zero-learning-rate step), loaded by transformers; GRPO's reward-model
reward is that model's score of the rollouts."""

import json

import numpy
import pytest
import torch
import torch.nn.functional as F
import transformers

from megatron_patch.tokenizer.byte import ByteTokenizer
from rlhf.data import PairRows, read_pairs
from rlhf.export import export_reward_model
from tests.launch import run_module
from tests.rlhf.logs import COMMON, PREFERENCES, SUM_PROMPTS, logged, mean

GBS, SEQ = 8, 96


def _hf_batch_values(hf_dir, iteration: int, iterations: int) -> tuple[float, float]:
    """Mean Bradley-Terry loss and margin of the HF model on iteration's global batch."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    tokenizer = ByteTokenizer()
    assert model.config.pad_token_id == tokenizer.pad and model.config.num_labels == 1
    pairs = read_pairs(PREFERENCES, tokenizer, SEQ, "fail")
    rows = PairRows(pairs, iterations * GBS, SEQ, tokenizer.pad, seed=1234)
    losses, margins = [], []
    for row in range((iteration - 1) * GBS, iteration * GBS, 2):
        prompt, chosen, rejected = pairs[rows.pair_index(row)]
        with torch.no_grad():
            # both answers in one right-padded batch: transformers finds each row's last token
            batch = torch.full((2, SEQ), tokenizer.pad)
            for i, answer in enumerate((chosen, rejected)):
                batch[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            scores = model(batch).logits[:, 0].double()
        losses.append(-F.logsigmoid(scores[0] - scores[1]).item())
        margins.append((scores[0] - scores[1]).item())
    return sum(losses) / len(losses), sum(margins) / len(margins)


def _train(checkpoint, save, iterations: int, lr: str, nproc: int, extra=()) -> str:
    return run_module("rlhf.reward_model", [
        *COMMON, "--load", str(checkpoint), "--finetune", "--no-load-optim", "--no-load-rng",
        "--save", str(save), "--save-interval", "1000", "--seq-length", str(SEQ),
        "--micro-batch-size", "4", "--global-batch-size", str(GBS),
        "--train-iters", str(iterations), "--lr", lr, "--min-lr", "0",
        "--lr-decay-style", "linear", "--lr-decay-iters", str(max(iterations - 1, 1)),
        "--train-data", str(PREFERENCES), *extra], nproc=nproc).stdout


@pytest.mark.distributed
def test_reward_model_learns_and_exports(rlhf_models, tmp_path):
    iterations = 20
    # the last step runs at learning rate 0: the saved weights logged the last iteration's values
    out = _train(rlhf_models["policy"][1], tmp_path / "run", iterations, "1e-3", 2,
                 ["--pipeline-model-parallel-size", "2"])
    losses, accuracy = logged(out, "rm loss"), logged(out, "accuracy")
    assert sorted(losses) == list(range(1, iterations + 1)), out[-2000:]
    first, last = range(1, 6), range(iterations - 4, iterations + 1)
    assert mean(losses, last) < mean(losses, first) - 0.2, losses
    assert mean(accuracy, last) > mean(accuracy, first), accuracy
    assert mean(accuracy, last) >= 0.95, accuracy
    hf = export_reward_model(tmp_path / "run", tmp_path / "hf")
    config = transformers.AutoConfig.from_pretrained(hf)
    assert config.architectures == ["LlamaForSequenceClassification"]
    loss, margin = _hf_batch_values(hf, iterations, iterations)
    assert loss == pytest.approx(losses[iterations], rel=1e-5)
    assert margin == pytest.approx(logged(out, "margin")[iterations], rel=1e-5)
    _check_grpo_reward_model_reward(rlhf_models["policy"], tmp_path / "run", hf)


def _check_grpo_reward_model_reward(policy, reward_run, reward_hf) -> None:
    """GRPO's reward-model reward, greedy rollouts: the logged mean reward of the first
    iteration equals the exported reward model's mean score of HF ``generate``'s completions."""
    policy_hf, policy_mcore = policy
    groups, group_size, new_tokens = 2, 2, 3
    out = run_module("rlhf.grpo", [
        *COMMON, "--load", str(policy_mcore), "--finetune", "--no-load-optim", "--no-load-rng",
        "--reward-model", str(reward_run), "--reward-fn", "none", "--train-data",
        str(SUM_PROMPTS), "--seq-length", "16", "--max-new-tokens", str(new_tokens),
        "--rl-default-temperature", "0", "--grpo-group-size", str(group_size),
        "--micro-batch-size", "2", "--global-batch-size", str(groups * group_size),
        "--train-iters", "1", "--lr", "1e-4"]).stdout
    order = numpy.random.default_rng(1234).permutation(100)  # Megatron's --seed, epoch 0
    records = [json.loads(line) for line in SUM_PROMPTS.read_text().splitlines()]
    tokenizer = ByteTokenizer()
    policy_model = transformers.AutoModelForCausalLM.from_pretrained(policy_hf).eval()
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(reward_hf).eval()
    scores = []
    for index in order[:groups]:
        prompt = tokenizer.tokenize(records[index]["prompt"])
        with torch.no_grad():
            row = policy_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                                        do_sample=False, eos_token_id=tokenizer.eod,
                                        pad_token_id=tokenizer.pad)
            scores.append(scorer(row).logits[0, 0].item())
    assert logged(out, "reward")[1] == pytest.approx(sum(scores) / len(scores), rel=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_export_scores_like_megatron(rlhf_models, tmp_path, family):
    out = _train(rlhf_models[family][1], tmp_path / "run", 1, "0", 1)
    hf = export_reward_model(tmp_path / "run", tmp_path / "hf")
    assert transformers.AutoConfig.from_pretrained(hf).architectures == [
        f"{family.capitalize()}ForSequenceClassification"]
    loss, margin = _hf_batch_values(hf, 1, 1)
    assert loss == pytest.approx(logged(out, "rm loss")[1], rel=1e-5)
    assert margin == pytest.approx(logged(out, "margin")[1], rel=1e-5)


def test_export_refuses_a_language_model_checkpoint(rlhf_models, tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint of rlhf.reward_model"):
        export_reward_model(rlhf_models["qwen2"][1], tmp_path / "hf")
