"""``python -m rlhf.grpo``: Group Relative Policy Optimization (Shao et al. 2024) with rollouts
from the policy itself, in-process.

Each rollout samples ``--grpo-group-size`` completions per prompt with the generation engine
(:class:`megatron_patch.generation.engine.Generator`, Megatron-Core's KV cache) running on the
policy's own model chunks, so the generator always has the trainer's current weights (no copy,
at any TP/PP). The reward function (``--reward-fn module:function``, see :mod:`rlhf.rewards`)
and/or a frozen reward model (``--reward-model``, trained by :mod:`rlhf.reward_model`, sharded
like the policy) score the completions; advantages are the rewards standardised within each
group. The loss per completion token is PPO's clipped surrogate plus ``--grpo-kl-beta`` times
the k3 estimate of KL(policy || reference), averaged over each completion's tokens and then over
completions; the ratio is clipped to ``[1 - --grpo-clamp-eps-lower, 1 + --grpo-clamp-eps-upper]``.
Each rollout serves ``--grpo-iterations`` optimizer steps, against the log-probabilities it was
sampled with (the ratio departs from 1 after the first). Sampling: ``--rl-default-temperature``,
``-top-p``, ``-top-k`` (Megatron-LM's RL flags, with their defaults).

Rows per iteration: ``--global-batch-size`` = prompts * group size completions; each data-
parallel rank samples whole groups. ``--seq-length`` bounds prompt + completion. Printed per log
interval: generated tokens/s of the rollouts (sampling only) and trained tokens/s of the policy
updates (forward + backward + optimizer step over prompt and completion tokens; the last
iteration's update is not timed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy
import torch
from megatron.core import parallel_state
from megatron.training.utils import print_rank_0

from megatron_patch.generation.engine import Generator
from megatron_patch.generation.sampling import SamplingParams
from megatron_patch.generation.stopping import StopChecker
from megatron_patch.training.logging import print_rank_last
from megatron_patch.training.loop import TrainState, next_batch
from rlhf.data import PromptRecord, read_prompts, sequence_rows
from rlhf.logprobs import (
    LogprobContext,
    collect_outputs,
    forward_logprobs,
    masked_sum,
    policy_forward_step,
)
from rlhf.losses import clipped_policy_loss, group_advantages, kl_k3
from rlhf.reward_model import add_value_head, score_forward_step
from rlhf.rewards import RewardFn, load_reward_fn
from rlhf.trainer import (
    StepBatches,
    build_frozen,
    build_reference,
    forward_only,
    parse_rlhf_args,
    run,
    setup,
)


def add_rollout_flags(parser: argparse.ArgumentParser) -> None:
    """Rewards and completion length of in-process rollouts (GRPO and PPO)."""
    parser.add_argument("--reward-fn", default="rlhf.rewards:exact_match",
                        help="module:function scoring (prompts, completions, records); none: "
                             "no rule-based reward")
    parser.add_argument("--reward-model", default=None,
                        help="checkpoint of rlhf.reward_model (the policy's architecture): its "
                             "score is added to the rule-based reward")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="completion length limit of the rollouts")


def add_grpo_flags(parser: argparse.ArgumentParser) -> None:
    """The GRPO options beyond Megatron-LM's own (``--grpo-group-size``, ``--grpo-kl-beta``,
    ``--grpo-clamp-eps-lower/upper``, ``--grpo-iterations``, ``--rl-default-temperature/
    top-p/top-k``, read with Megatron's names and defaults)."""
    add_rollout_flags(parser)
    parser.add_argument("--grpo-no-std-scale", dest="grpo_std_scale", action="store_false",
                        help="advantages: reward minus group mean, not divided by the group std")


def grpo_loss_func(batch: dict[str, torch.Tensor], args: argparse.Namespace,
                   output: torch.Tensor):
    """Megatron loss function: per-completion mean token loss summed over rows, count, reports."""
    mask = batch["loss_mask"]
    old = batch.get("old_logps")
    old = output.detach() if old is None else old
    per_token, clipped = clipped_policy_loss(output, old, batch["advantages"][:, None],
                                             args.grpo_clamp_eps_lower, args.grpo_clamp_eps_upper)
    lengths = mask.sum(dim=-1).clamp(min=1)
    kl = torch.zeros_like(lengths)
    if "reference_logps" in batch:
        token_kl = kl_k3(output, batch["reference_logps"])
        per_token = per_token + args.grpo_kl_beta * token_kl
        kl = masked_sum(token_kl.detach(), mask) / lengths
    losses = masked_sum(per_token, mask) / lengths
    rows = torch.tensor(float(losses.numel()), device=losses.device)

    def report(value: torch.Tensor) -> torch.Tensor:
        return torch.stack([value.sum().detach().float(), rows])

    return losses.sum(), rows.to(torch.int), {
        "grpo loss": report(losses), "reward": report(batch["rewards"]), "kl": report(kl),
        "clip fraction": report(masked_sum(clipped, mask) / lengths),
        "completion length": report(mask.sum(dim=-1))}


def logprob_forward_step(data_iterator: Iterator, model: torch.nn.Module, *,
                         context: LogprobContext):
    """Forward step reporting per-token log-probabilities (reference or sampling policy)."""
    batch = next_batch(data_iterator)
    return forward_logprobs(model, batch, context), collect_outputs("logps")


@dataclass
class Timing:
    """Tokens and seconds of rollouts and policy updates, for tokens/s."""

    generated: int = 0
    generation_s: float = 0.0
    trained: int = 0
    training_s: float = 0.0
    update_started: float | None = field(default=None, repr=False)
    update_tokens: int = field(default=0, repr=False)

    def update_done(self, now: float) -> None:
        """Count the policy update that started at ``update_started`` as finished at ``now``."""
        if self.update_started is not None:
            self.training_s += now - self.update_started
            self.trained += self.update_tokens

    def summary(self) -> str:
        """Throughput so far."""
        return (f"rollout {self.generated / max(self.generation_s, 1e-9):.1f} tokens/s "
                f"({self.generated} generated tokens), training "
                f"{self.trained / max(self.training_s, 1e-9):.1f} tokens/s "
                f"({self.trained} trained tokens)")


class Rollouts:
    """``before_step`` of GRPO: samples, scores and prepares each iteration's micro-batches."""

    name = "GRPO"

    def __init__(self, args: argparse.Namespace, state: TrainState, tokenizer, vocab_rows: int,
                 prompts: list[PromptRecord], reward_fn: RewardFn | None,
                 context: LogprobContext):
        self.args, self.state, self.tokenizer = args, state, tokenizer
        self.prompts, self.reward_fn, self.context = prompts, reward_fn, context
        dp = parallel_state.get_data_parallel_world_size()
        self.rows = args.global_batch_size // dp
        if self.rows % args.grpo_group_size:
            raise ValueError(f"rlhf.grpo: each data-parallel rank's {self.rows} rows "
                             f"(--global-batch-size / DP) must hold whole groups of "
                             f"--grpo-group-size {args.grpo_group_size}")
        self.groups = self.rows // args.grpo_group_size
        self.generator = Generator(state.model[0].module, vocab_rows=vocab_rows,
                                   pad_id=tokenizer.pad)
        self.params = SamplingParams(temperature=args.rl_default_temperature,
                                     top_k=max(args.rl_default_top_k, 0),
                                     top_p=args.rl_default_top_p or 1.0, seed=args.seed)
        self.stop = StopChecker(tokenizer, [tokenizer.eod])
        self.reference = build_reference(args, state) if self.kl_weight() > 0 else None
        self.reward_model = None
        if args.reward_model:
            self.reward_model = build_frozen(args, args.reward_model, add_value_head)
            print_rank_0(f"> reward model: {args.reward_model}")
        self.timing = Timing()
        self.batches: list[dict[str, torch.Tensor]] = []

    def kl_weight(self) -> float:
        """Weight of the KL to the reference (none is built when 0)."""
        return self.args.grpo_kl_beta

    def _prompt(self, slot: int) -> PromptRecord:
        epoch, index = divmod(slot, len(self.prompts))
        order = numpy.random.default_rng(self.args.seed + epoch).permutation(len(self.prompts))
        return self.prompts[int(order[index])]

    def _sample(self, rollout: int) -> tuple[list[PromptRecord], list]:
        dp_rank = parallel_state.get_data_parallel_rank()
        first = (rollout * parallel_state.get_data_parallel_world_size() + dp_rank) * self.groups
        prompts = [self._prompt(first + g) for g in range(self.groups)
                   for _ in range(self.args.grpo_group_size)]
        first_row = (rollout * parallel_state.get_data_parallel_world_size() + dp_rank) * self.rows
        for chunk in self.state.model:
            chunk.eval()
        completions = self.generator.generate_batch(
            [p.ids for p in prompts], [self.args.max_new_tokens] * len(prompts), self.params,
            self.stop, indices=range(first_row, first_row + len(prompts)))
        for chunk in self.state.model:
            chunk.train()
        return prompts, completions

    def _scored_batches(self, prompts: list[PromptRecord], completions: list
                        ) -> list[dict[str, torch.Tensor]]:
        """The rollout's micro-batches with each row's reward (``rewards``)."""
        rows = sequence_rows([p.ids for p in prompts], [c.tokens for c in completions],
                             self.args.seq_length, self.tokenizer.pad)
        size = self.args.micro_batch_size
        batches = [next_batch(iter([{k: v[i:i + size] for k, v in rows.items()}]))
                   for i in range(0, self.rows, size)]
        rewards = torch.zeros(self.rows)
        if self.reward_fn is not None:
            rewards += torch.tensor(self.reward_fn([p.text for p in prompts],
                                                   [c.text for c in completions],
                                                   [p.record for p in prompts]))
        if self.reward_model is not None:  # scores exist on the last stage, where losses are
            step = partial(score_forward_step, pad_id=self.tokenizer.pad)
            scores = forward_only(self.reward_model, batches, step, self.args)
            if scores:
                rewards += torch.cat([s["scores"] for s in scores]).float().cpu()
        for index, batch in enumerate(batches):
            batch["rewards"] = rewards[index * size:(index + 1) * size].to(batch["tokens"].device)
        return batches

    def _micro_batches(self, prompts: list[PromptRecord], completions: list
                       ) -> list[dict[str, torch.Tensor]]:
        batches = self._scored_batches(prompts, completions)
        rewards = torch.cat([b["rewards"] for b in batches]).cpu()
        advantages = group_advantages(rewards, self.args.grpo_group_size,
                                      self.args.grpo_std_scale)
        size = self.args.micro_batch_size
        for index, batch in enumerate(batches):
            part = slice(index * size, (index + 1) * size)
            batch["advantages"] = advantages[part].to(batch["tokens"].device)
        return batches

    def _count(self, value: float) -> int:
        total = torch.tensor([value], dtype=torch.float64)
        if torch.cuda.is_available():
            total = total.cuda()
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return int(total.item())

    def _rollout(self, rollout: int, started: float) -> tuple[list[PromptRecord], list]:
        """Sample rollout number ``rollout`` (begun at ``started``), counting its tokens."""
        prompts, completions = self._sample(rollout)
        generated = self._count(sum(len(c.tokens) for c in completions))
        self.timing.generation_s += time.perf_counter() - started
        self.timing.generated += generated
        return prompts, completions

    def _add_logprobs(self, model: list[torch.nn.Module], key: str) -> None:
        """Store ``model``'s per-token log-probabilities of the rollout under ``key``."""
        step = partial(logprob_forward_step, context=self.context)
        for batch, out in zip(self.batches, forward_only(model, self.batches, step, self.args)):
            batch[key] = out["logps"]

    def _start_update(self, state: TrainState, queue: StepBatches,
                      started: float | None = None) -> None:
        """Count the update's tokens, log throughput, queue the batches; the update's clock
        runs from ``started`` (default: now)."""
        self.timing.update_tokens = self._count(
            sum(int(b["tokens"].ne(self.tokenizer.pad).sum()) for b in self.batches))
        if (state.iteration + 1) % self.args.log_interval == 0:
            print_rank_last(f" {self.name} iteration {state.iteration + 1}: "
                            f"{self.timing.summary()}")
        queue.fill([dict(b) for b in self.batches])
        self.timing.update_started = time.perf_counter() if started is None else started

    def __call__(self, state: TrainState, queue: StepBatches) -> None:
        now = time.perf_counter()
        self.timing.update_done(now)
        steps = self.args.grpo_iterations
        if state.iteration % steps == 0:
            self.batches = self._micro_batches(*self._rollout(state.iteration // steps, now))
            if self.reference is not None:
                self._add_logprobs(self.reference, "reference_logps")
            if steps > 1:
                self._add_logprobs(state.model, "old_logps")
        self._start_update(state, queue)


def rollout_reward_fn(args: argparse.Namespace, prog: str) -> RewardFn | None:
    """Check the flags of in-process rollouts; the rule-based reward callable (or None)."""
    if args.sequence_parallel:
        raise ValueError(f"{prog}: --sequence-parallel is not supported (rollouts decode one "
                         "token per sequence per step)")
    if args.reward_fn == "none" and not args.reward_model:
        raise ValueError(f"{prog}: no reward: give --reward-fn and/or --reward-model")
    return None if args.reward_fn == "none" else load_reward_fn(args.reward_fn)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train with GRPO; returns the last logged values (on the last rank)."""
    args = parse_rlhf_args(argv, add_grpo_flags, "rlhf.grpo")
    reward_fn = rollout_reward_fn(args, "rlhf.grpo")
    state, tokenizer, vocab_rows = setup(args)
    context = LogprobContext(vocab_rows, args.rl_default_temperature or 1.0)
    prompts = read_prompts(args.train_data, tokenizer, args.seq_length - args.max_new_tokens,
                           args.on_error)
    print_rank_0(f"> prompts: {len(prompts)}")
    rollouts = Rollouts(args, state, tokenizer, vocab_rows, prompts, reward_fn, context)
    forward_step = partial(policy_forward_step, context=context, loss_func=grpo_loss_func,
                           args=args)
    losses = run(state, args, forward_step, rollouts)
    print_rank_last(f" GRPO throughput: {rollouts.timing.summary()}")
    return losses


if __name__ == "__main__":
    main()
