"""``python -m rlhf.dpo``: Direct Preference Optimization from an SFT checkpoint.

Takes the Megatron-LM training flags (``--load`` the SFT checkpoint with ``--finetune
--no-load-optim --no-load-rng``, TP/PP, optimizer, ``--save``) plus ``--train-data`` (preference
JSONL, see :mod:`rlhf.data`), ``--ref-load`` and the DPO options below. Each iteration first runs
the frozen reference model (same TP/PP layout, same job) forward-only over the global batch,
then the policy's forward/backward with the DPO loss. Logged per iteration: ``dpo loss``,
``reward accuracy`` (chosen implicit reward above the rejected one), ``reward margin`` and the
mean ``chosen reward``/``rejected reward`` (``beta * log(pi / pi_ref)`` of each answer).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from megatron.training.utils import print_rank_0

from megatron_patch.training.loop import next_batch
from megatron_patch.training.pretrain_data import data_iterator
from rlhf.data import PairRows, read_pairs
from rlhf.logprobs import (
    LogprobContext,
    collect_outputs,
    forward_logprobs,
    masked_sum,
    policy_forward_step,
)
from rlhf.losses import DPO_LOSSES, dpo_loss
from rlhf.trainer import (
    build_reference,
    check_even_rows,
    forward_only,
    global_batch,
    parse_rlhf_args,
    run,
    setup,
)


def add_dpo_flags(parser: argparse.ArgumentParser) -> None:
    """The DPO options."""
    parser.add_argument("--dpo-beta", type=float, default=0.1,
                        help="strength of the implicit KL constraint (beta)")
    parser.add_argument("--dpo-loss", choices=DPO_LOSSES, default="sigmoid",
                        help="sigmoid: DPO; ipo: IPO on per-token mean log-probabilities")
    parser.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                        help="probability that a preference label is flipped (cDPO)")
    parser.add_argument("--dpo-reference-free", action="store_true",
                        help="no reference model (a uniform reference)")


def sequence_logprobs(output: torch.Tensor, batch: dict[str, torch.Tensor],
                      mean: bool) -> torch.Tensor:
    """Answer log-probability per row: summed over its tokens, or their mean."""
    mask = batch["loss_mask"]
    total = masked_sum(output, mask)
    return total / mask.sum(dim=-1).clamp(min=1) if mean else total


def dpo_loss_func(batch: dict[str, torch.Tensor], args: argparse.Namespace,
                  output: torch.Tensor):
    """Megatron loss function: DPO summed over the micro-batch's pairs, their count, reports."""
    mean = args.dpo_loss == "ipo"
    logps = sequence_logprobs(output, batch, mean)
    reference = batch.get("reference_logps")
    if reference is not None and mean:
        reference = reference / batch["loss_mask"].sum(dim=-1).clamp(min=1)
    losses, chosen, rejected = dpo_loss(
        logps[0::2], logps[1::2], None if reference is None else reference[0::2],
        None if reference is None else reference[1::2], beta=args.dpo_beta,
        loss_type=args.dpo_loss, label_smoothing=args.dpo_label_smoothing)
    pairs = torch.tensor(float(losses.numel()), device=losses.device)

    def report(value: torch.Tensor) -> torch.Tensor:
        return torch.stack([value.sum().detach().float(), pairs])

    reported = {"dpo loss": report(losses), "reward accuracy": report((chosen > rejected).float()),
                "reward margin": report(chosen - rejected), "chosen reward": report(chosen),
                "rejected reward": report(rejected)}
    return losses.sum(), pairs.to(torch.int), reported


def reference_forward_step(data_iterator: Iterator, model: torch.nn.Module, *,
                           context: LogprobContext):
    """Forward step of the reference model: summed answer log-probabilities per row."""
    batch = next_batch(data_iterator)
    output = forward_logprobs(model, batch, context)
    return output, lambda out: collect_outputs("logps")(sequence_logprobs(out, batch, False))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train with DPO; returns the last logged values (on the last rank)."""
    args = parse_rlhf_args(argv, add_dpo_flags, "rlhf.dpo")
    check_even_rows(args, "rlhf.dpo")
    state, tokenizer, vocab_rows = setup(args)
    context = LogprobContext(vocab_rows)
    pairs = read_pairs(args.train_data, tokenizer, args.seq_length, args.on_error)
    rows = PairRows(pairs, args.train_iters * args.global_batch_size, args.seq_length,
                    tokenizer.pad, args.seed)
    print_rank_0(f"> preference data: {len(pairs)} pairs")
    reference = None if args.dpo_reference_free else build_reference(args, state)
    data = data_iterator(rows, args, args.consumed_train_samples)
    reference_step = partial(reference_forward_step, context=context)

    def before_step(_, queue) -> None:
        batches = global_batch(data)
        if reference is not None:
            outputs = forward_only(reference, batches, reference_step, args)
            for batch, out in zip(batches, outputs):
                batch["reference_logps"] = out["logps"]
        queue.fill(batches)

    forward_step = partial(policy_forward_step, context=context, loss_func=dpo_loss_func,
                           args=args)
    return run(state, args, forward_step, before_step)


if __name__ == "__main__":
    main()
