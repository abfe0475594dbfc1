"""``python -m rlhf.reward_model``: a reward model: the GPT backbone plus a scalar value head,
trained with the pairwise Bradley-Terry loss on preference data (:mod:`rlhf.data`).

The value head (``value_head.weight`` [1, hidden], no bias) sits on the last pipeline stage and
reads the final-norm hidden state at each row's last non-padding token, as transformers'
``*ForSequenceClassification`` (``num_labels=1``) does, so :mod:`rlhf.export` writes a model
that scores like this one. Start from an SFT/pretrained checkpoint with ``--load DIR
--finetune --no-load-optim --no-load-rng`` (the head is then initialised; its absence from the
checkpoint is logged, not an error). Logged per iteration: ``rm loss``, ``accuracy`` (chosen
scored above rejected) and ``margin`` (mean chosen minus rejected score).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from megatron.core.utils import unwrap_model
from megatron.training.utils import print_rank_0

from megatron_patch.training.loop import next_batch
from megatron_patch.training.pretrain_data import data_iterator
from rlhf.data import PairRows, read_pairs
from rlhf.logprobs import collect_outputs, value_scores
from rlhf.losses import bradley_terry_loss
from rlhf.trainer import check_even_rows, global_batch, parse_rlhf_args, run, setup

VALUE_HEAD = "value_head"


def add_value_head(model: torch.nn.Module) -> None:
    """Give a model chunk that holds the output (last pipeline stage) a value head."""
    if not model.post_process:
        return
    config = model.config
    head = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=config.params_dtype)
    head.sequence_parallel = config.sequence_parallel  # read by value_scores
    setattr(model, VALUE_HEAD, head)


def last_token_index(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Position of each row's last non-padding token (transformers' sequence-classification
    rule: the rightmost token that is not ``pad_id``)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return (positions * (tokens != pad_id)).argmax(dim=-1)


def sequence_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Value-head scores of every position [rows, seq] (hidden states before the last stage)."""
    return model(batch["tokens"], batch["position_ids"], None, output_processor=value_scores,
                 output_processor_context=getattr(unwrap_model(model), VALUE_HEAD, None))


def reward_loss_func(batch: dict[str, torch.Tensor], pad_id: int, output: torch.Tensor):
    """Megatron loss function: Bradley-Terry loss summed over the pairs, count, reports."""
    rows = torch.arange(output.shape[0], device=output.device)
    scores = output[rows, last_token_index(batch["tokens"], pad_id)]
    chosen, rejected = scores[0::2], scores[1::2]
    losses = bradley_terry_loss(chosen, rejected)
    pairs = torch.tensor(float(losses.numel()), device=losses.device)

    def report(value: torch.Tensor) -> torch.Tensor:
        return torch.stack([value.sum().detach().float(), pairs])

    return losses.sum(), pairs.to(torch.int), {
        "rm loss": report(losses), "accuracy": report((chosen > rejected).float()),
        "margin": report(chosen - rejected)}


def score_forward_step(data_iterator: Iterator, model: torch.nn.Module, *, pad_id: int):
    """Forward step of a frozen reward model: reports each row's score (forward-only passes)."""
    batch = next_batch(data_iterator)

    def scores(output: torch.Tensor):
        rows = torch.arange(output.shape[0], device=output.device)
        return collect_outputs("scores")(output[rows, last_token_index(batch["tokens"], pad_id)])

    return sequence_scores(model, batch), scores


def reward_forward_step(data_iterator: Iterator, model: torch.nn.Module, *, pad_id: int):
    """Megatron forward step of the reward model."""
    batch = next_batch(data_iterator)
    return sequence_scores(model, batch), partial(reward_loss_func, batch, pad_id)


def _no_flags(parser: argparse.ArgumentParser) -> None:
    """The reward model has no options beyond the common ones."""


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train a reward model; returns the last logged values (on the last rank)."""
    args = parse_rlhf_args(argv, _no_flags, "rlhf.reward_model")
    check_even_rows(args, "rlhf.reward_model")
    if args.finetune and args.dist_ckpt_strictness == "assume_ok_unexpected":
        # an LM checkpoint has no value head: Megatron-Core logs the key it lacks and skips it
        args.dist_ckpt_strictness = "log_unexpected"
    state, tokenizer, _ = setup(args, add_value_head)
    pairs = read_pairs(args.train_data, tokenizer, args.seq_length, args.on_error)
    print_rank_0(f"> preference data: {len(pairs)} pairs")
    rows = PairRows(pairs, args.train_iters * args.global_batch_size, args.seq_length,
                    tokenizer.pad, args.seed)
    data = data_iterator(rows, args, args.consumed_train_samples)
    return run(state, args, partial(reward_forward_step, pad_id=tokenizer.pad),
               lambda _, queue: queue.fill(global_batch(data)))


if __name__ == "__main__":
    main()
