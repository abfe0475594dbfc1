"""``finetune`` entry point: supervised fine-tuning on chat/instruction data (Megatron-LM flags).

``python -m megatron_patch.training.finetune`` takes the pretrain flags plus ``--sft-packing``,
``--sft-train-on-prompt``, ``--sft-loss-average`` and ``--on-error``; the data is given by
``--data-path``/``--split`` or ``--train-data-path``/``--valid-data-path`` (see
:mod:`megatron_patch.data.sft`). Start from a pretrained or converted checkpoint with
``--load DIR --finetune --no-load-optim --no-load-rng`` (weights only, iteration 0); a run
resumes from its own checkpoints with ``--load`` alone.

The loss is normalised over the global batch: Megatron's ``--calculate-per-token-loss`` is on by
default here, so gradients and the logged ``lm loss`` are sums over all micro-batches and
data-parallel ranks divided by their token count (``per-token``) or sequence count
(``per-sequence``, each sequence weighted by its own token count).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from functools import partial

import torch

from megatron_patch.arguments import parse_training_args
from megatron_patch.training.loop import lm_loss, next_batch, on_this_cp_rank
from megatron_patch.training.pretrain import run_training
from megatron_patch.training.sft_data import build_sft_datasets, loss_weights, packed_batch

FINETUNE_DEFAULTS = {"calculate_per_token_loss": True}


def sft_forward_step(data_iterator: Iterator | None, model: torch.nn.Module, *,
                     seq_length: int, per_sequence: bool):
    """Megatron forward step for SFT rows (padded, or packed into THD sequences)."""
    batch, packed_seq_params = packed_batch(next_batch(data_iterator), seq_length)
    weights = loss_weights(batch, per_sequence)  # from whole sequences, then split over CP
    if packed_seq_params is None:
        batch = on_this_cp_rank({key: batch[key] for key in ("tokens", "position_ids", "labels")}
                                | {"loss_weights": weights})
        weights = batch["loss_weights"]
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   packed_seq_params=packed_seq_params)
    return output, partial(lm_loss, weights)


def forward_step_for(args: argparse.Namespace):
    """The SFT forward step configured by ``args``."""
    return partial(sft_forward_step, seq_length=args.seq_length,
                   per_sequence=args.sft_loss_average == "per-sequence")


def parse_finetune_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Megatron + megatron-patch arguments with the fine-tuning defaults."""
    return parse_training_args(argv, defaults=FINETUNE_DEFAULTS)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fine-tune a causal LM; returns the last logged losses (on the last rank)."""
    args = parse_finetune_args(argv)
    return run_training(args, build_sft_datasets, forward_step_for(args))


if __name__ == "__main__":
    main()
