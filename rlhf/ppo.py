"""``python -m rlhf.ppo``: Proximal Policy Optimization with a critic (Ouyang et al. 2022's
RLHF recipe), rollouts from the policy itself, in-process.

Rollouts, rewards and sampling are GRPO's (:mod:`rlhf.grpo`: the generation engine on the
policy's own chunks, ``--reward-fn`` and/or ``--reward-model``, ``--rl-default-*``); each prompt
is sampled ``--grpo-group-size`` times. Per completion token the reward is ``-(--ppo-kl-coef)``
times ``log pi - log pi_ref`` (the sampling policy against the frozen reference), plus the
sequence reward at the completion's last token. The critic, a GPT backbone with the reward
model's value head (:mod:`rlhf.reward_model`), estimates each token's value; GAE
(``--ppo-gamma``, ``--ppo-lam``) turns rewards and values into advantages (whitened over the
global batch unless ``--ppo-no-whiten-advantages``) and returns.

The critic starts from ``--critic-load`` (default ``--reward-model``: a reward-model checkpoint
of the policy's architecture), else from the initial policy with a zero value head. It is
sharded like the policy and trained in the same job with its own optimizer and LR schedule
(Megatron's optimizer flags, ``--critic-lr`` for its peak LR): each iteration's ``before_step``
updates it on the rollout with PPO's clipped value loss (``--ppo-value-clip``), then
:func:`megatron_patch.training.loop.train` updates the policy with the clipped surrogate (ratio
in ``[1 - --grpo-clamp-eps-lower, 1 + --grpo-clamp-eps-upper]``). Each rollout serves
``--grpo-iterations`` steps of both. Logged per iteration: ``ppo loss``, ``reward`` (sequence
rewards), ``kl`` (per-token mean of the sampled log-ratio), ``clip fraction``, ``value loss``
and ``value clip fraction`` (the critic's step of that iteration). Printed per log interval:
rollout tokens/s and trained tokens/s (critic + policy updates). The critic is saved with
each policy checkpoint, into ``--save/critic`` (same iteration, written before the policy's);
resuming from ``--load`` continues it with its optimizer state.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model
from megatron.training.utils import print_rank_0

from megatron_patch.training.checkpoint import iteration_dir
from megatron_patch.training.logging import print_rank_last
from megatron_patch.training.loop import (
    TrainState,
    _configure_model_hooks,
    next_batch,
    setup_model_and_optimizer,
    train_step,
)
from rlhf.data import read_prompts
from rlhf.grpo import Rollouts, add_rollout_flags, rollout_reward_fn
from rlhf.logprobs import LogprobContext, collect_outputs, masked_sum, policy_forward_step
from rlhf.losses import clipped_policy_loss, clipped_value_loss, gae, ppo_token_rewards
from rlhf.reward_model import VALUE_HEAD, add_value_head, sequence_scores
from rlhf.trainer import (
    StepBatches,
    _overridden,
    copy_weights,
    forward_only,
    parse_rlhf_args,
    resumes_own_run,
    run,
    setup,
)

Batch = dict[str, torch.Tensor]


def add_ppo_flags(parser: argparse.ArgumentParser) -> None:
    """PPO's options beyond GRPO's rollout flags and Megatron-LM's RL flags (``--grpo-group-
    size``: samples per prompt, ``--grpo-iterations``: steps per rollout, ``--grpo-clamp-eps-
    lower/upper``: ratio clip)."""
    add_rollout_flags(parser)
    parser.add_argument("--critic-load", default=None,
                        help="checkpoint of the critic's initial weights, a rlhf.reward_model "
                             "checkpoint (default: --reward-model; neither: the initial policy "
                             "with a zero value head)")
    parser.add_argument("--critic-lr", type=float, default=None,
                        help="peak learning rate of the critic (default: --lr)")
    parser.add_argument("--ppo-kl-coef", type=float, default=0.05,
                        help="weight of the per-token KL penalty to the reference in the reward "
                             "(0: no reference model)")
    parser.add_argument("--ppo-gamma", type=float, default=1.0, help="GAE discount")
    parser.add_argument("--ppo-lam", type=float, default=0.95, help="GAE lambda")
    parser.add_argument("--ppo-value-clip", type=float, default=0.2,
                        help="how far a value may move from the rollout's before the value loss "
                             "stops rewarding it")
    parser.add_argument("--ppo-no-whiten-advantages", dest="ppo_whiten", action="store_false",
                        help="use GAE advantages as they are (default: zero mean, unit variance "
                             "over the global batch's completion tokens)")


def ppo_loss_func(batch: Batch, args: argparse.Namespace, output: torch.Tensor):
    """Megatron loss function of the policy: per-completion mean clipped surrogate summed over
    rows, count, reports (the critic's value loss of this iteration included)."""
    mask = batch["loss_mask"]
    per_token, clipped = clipped_policy_loss(output, batch["old_logps"], batch["advantages"],
                                             args.grpo_clamp_eps_lower, args.grpo_clamp_eps_upper)
    lengths = mask.sum(dim=-1).clamp(min=1)
    losses = masked_sum(per_token, mask) / lengths
    rows = torch.tensor(float(losses.numel()), device=losses.device)

    def report(value: torch.Tensor) -> torch.Tensor:
        return torch.stack([value.sum().detach().float(), rows])

    reports = {"ppo loss": report(losses), "reward": report(batch["rewards"]),
               "kl": report(masked_sum(batch["kl"], mask) / lengths),
               "clip fraction": report(masked_sum(clipped, mask) / lengths)}
    for key in ("value loss", "value clip fraction"):
        if key in batch:
            reports[key] = report(batch[key])
    return losses.sum(), rows.to(torch.int), reports


def value_loss_func(batch: Batch, args: argparse.Namespace, output: torch.Tensor):
    """Megatron loss function of the critic: per-completion mean clipped value loss summed over
    rows, count, reports."""
    mask = batch["loss_mask"]
    per_token, clipped = clipped_value_loss(output, batch["old_values"], batch["returns"],
                                            args.ppo_value_clip)
    lengths = mask.sum(dim=-1).clamp(min=1)
    losses = masked_sum(per_token, mask) / lengths
    rows = torch.tensor(float(losses.numel()), device=losses.device)

    def report(value: torch.Tensor) -> torch.Tensor:
        return torch.stack([value.sum().detach().float(), rows])

    return losses.sum(), rows.to(torch.int), {
        "value loss": report(losses),
        "value clip fraction": report(masked_sum(clipped, mask) / lengths)}


def critic_forward_step(data_iterator: Iterator, model: torch.nn.Module, *,
                        args: argparse.Namespace):
    """Megatron forward step of the critic (training)."""
    batch = next_batch(data_iterator)
    return sequence_scores(model, batch), partial(value_loss_func, batch, args)


def value_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Forward step reporting the critic's value at every position (forward-only passes)."""
    batch = next_batch(data_iterator)
    return sequence_scores(model, batch), collect_outputs("values")


CRITIC = "critic"  # the critic's checkpoints: a subdirectory of the policy's


def _resumed_critic(args: argparse.Namespace, policy: TrainState) -> Path | None:
    """``--load/critic`` when the policy resumed its own run; None for a fresh start. A resumed
    run without the critic of its iteration is an error."""
    if not resumes_own_run(args, policy):
        return None
    iteration = policy.iteration
    directory = Path(args.load) / CRITIC
    if not iteration_dir(directory, iteration).is_dir():
        raise FileNotFoundError(
            f"{args.load} resumes PPO at iteration {iteration} but "
            f"{iteration_dir(directory, iteration)} (the critic of that iteration) is missing; "
            "add --finetune to start a new run from these policy weights")
    return directory


def build_critic(args: argparse.Namespace, policy: TrainState) -> TrainState:
    """The critic: value-head model sharded like the policy, with its own optimizer and LR
    schedule, from ``--critic-load`` / ``--reward-model`` or the initial policy; a resumed run
    continues the critic saved with the policy's checkpoint (``--load/critic``)."""
    resumed = _resumed_critic(args, policy)
    source = str(resumed) if resumed else args.critic_load or args.reward_model
    with _overridden(args, load=source, finetune=not resumed, no_load_optim=not resumed,
                     no_load_rng=True, ckpt_step=policy.iteration if resumed else None,
                     lr=args.critic_lr or args.lr,
                     consumed_train_samples=args.consumed_train_samples,
                     consumed_valid_samples=args.consumed_valid_samples):
        critic = setup_model_and_optimizer(args, add_value_head)
    policy.companions[CRITIC] = critic
    if not source:
        copy_weights(policy.model, critic.model)
        with torch.no_grad():
            for chunk in critic.model:
                head = getattr(unwrap_model(chunk), VALUE_HEAD, None)
                if head is not None:
                    head.weight.zero_()
        critic.optimizer.reload_model_params()  # the optimizer's main copies of the weights
    _configure_model_hooks(critic)
    for chunk in critic.model:
        chunk.train()
    print_rank_0(f"> critic: {source or 'the initial policy with a zero value head'}"
                 + (f" (iteration {critic.iteration})" if resumed else ""))
    return critic


def whiten(batches: list[Batch], key: str) -> None:
    """Shift and scale ``batch[key]`` to zero mean and unit variance over the completion tokens
    of the global batch (all data-parallel ranks)."""
    stats = torch.zeros(3, dtype=torch.float64, device=batches[0][key].device)
    for batch in batches:
        values, mask = batch[key].double(), batch["loss_mask"].double()
        stats += torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(), mask.sum()])
    torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    mean = stats[0] / stats[2].clamp(min=1)
    std = (stats[1] / stats[2].clamp(min=1) - mean ** 2).clamp(min=0).sqrt()
    for batch in batches:
        batch[key] = ((batch[key] - mean) / (std + 1e-8) * batch["loss_mask"]).float()


class PPORollouts(Rollouts):
    """``before_step`` of PPO: samples and scores a rollout, computes GAE advantages and
    returns, and updates the critic; the policy update follows in the training step."""

    name = "PPO"

    def __init__(self, *args, critic: TrainState, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.critic = critic
        self.critic_queue = StepBatches()

    def kl_weight(self) -> float:
        return self.args.ppo_kl_coef

    def _advantages(self, state: TrainState) -> None:
        """Old log-probabilities and values, per-token rewards, GAE (last pipeline stage)."""
        self._add_logprobs(state.model, "old_logps")
        if self.reference is not None:
            self._add_logprobs(self.reference, "reference_logps")
        values = forward_only(self.critic.model, self.batches, value_forward_step, self.args)
        if not values:
            return
        for batch, out in zip(self.batches, values, strict=True):
            mask = batch["loss_mask"]
            batch["old_values"] = out["values"] * mask
            batch["kl"] = ((batch["old_logps"] - batch["reference_logps"]) * mask
                           if "reference_logps" in batch else torch.zeros_like(mask))
            rewards = ppo_token_rewards(batch["rewards"], batch["kl"], mask,
                                        self.args.ppo_kl_coef)
            batch["advantages"], batch["returns"] = gae(
                rewards, batch["old_values"], mask, self.args.ppo_gamma, self.args.ppo_lam)
        if self.args.ppo_whiten:
            whiten(self.batches, "advantages")

    def __call__(self, state: TrainState, queue: StepBatches) -> None:
        now = time.perf_counter()
        self.timing.update_done(now)
        steps = self.args.grpo_iterations
        if state.iteration % steps == 0:
            self.batches = self._scored_batches(*self._rollout(state.iteration // steps, now))
            self._advantages(state)
        started = time.perf_counter()
        self.critic_queue.fill([dict(b) for b in self.batches])
        critic_step = partial(critic_forward_step, args=self.args)
        reports, _, _ = train_step(self.critic, [self.critic_queue], critic_step, self.args)
        self.critic.iteration += 1
        for batch in self.batches:
            for key, value in reports.items():
                batch[key] = torch.full_like(batch["rewards"], value)
        self._start_update(state, queue, started)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train with PPO; returns the last logged values (on the last rank)."""
    args = parse_rlhf_args(argv, add_ppo_flags, "rlhf.ppo")
    reward_fn = rollout_reward_fn(args, "rlhf.ppo")
    state, tokenizer, vocab_rows = setup(args)
    critic = build_critic(args, state)
    context = LogprobContext(vocab_rows, args.rl_default_temperature or 1.0)
    prompts = read_prompts(args.train_data, tokenizer, args.seq_length - args.max_new_tokens,
                           args.on_error)
    print_rank_0(f"> prompts: {len(prompts)}")
    rollouts = PPORollouts(args, state, tokenizer, vocab_rows, prompts, reward_fn, context,
                           critic=critic)
    forward_step = partial(policy_forward_step, context=context, loss_func=ppo_loss_func,
                           args=args)
    losses = run(state, args, forward_step, rollouts)
    print_rank_last(f" PPO throughput: {rollouts.timing.summary()}")
    return losses


if __name__ == "__main__":
    main()
