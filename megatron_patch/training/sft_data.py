"""SFT data for training: datasets from the flags, and micro-batches as the model takes them.

Packed micro-batches (rows with ``cu_seqlens``) are flattened by Megatron-Core's own
``flatten_batch_for_packed_sequences`` into one THD sequence of ``micro_batch_size *
seq_length`` tokens whose ``cu_seqlens`` lists the documents of every row. That is the layout
Transformer Engine's fused attention and Megatron's THD RoPE (positions restarting per
document) take; the torch attention splits it back into rows (``tokens_per_sample``), see
:mod:`megatron_patch.models.common.packed_seq`. So ``--micro-batch-size`` > 1 works packed.

Loss weights: ``per-token`` gives every assistant token weight 1 (and with Megatron's
``--calculate-per-token-loss`` the gradient is divided by the global batch's token count);
``per-sequence`` gives the tokens of a sequence (a sample) weight ``1 / its token count``, so
the same normalisation averages the sequences' mean losses.
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import flatten_batch_for_packed_sequences

from megatron_patch.data.sft import SFTDataset, SFTDatasetConfig
from megatron_patch.models.common.packed_seq import segment_ids
from megatron_patch.training.pretrain_data import dataset_config_values

LOSS_AVERAGES = ("per-token", "per-sequence")


def sft_dataset_config(args: argparse.Namespace, tokenizer) -> SFTDatasetConfig:
    """SFT dataset config from Megatron's data flags and ours."""
    values = dataset_config_values(args)
    if values["blend"] is None and values["blend_per_split"] is None:
        raise ValueError("finetune needs SFT data: --data-path (with --split) or "
                         "--train-data-path/--valid-data-path")
    return SFTDatasetConfig(**values, tokenizer=tokenizer, packing=args.sft_packing,
                            train_on_prompt=args.sft_train_on_prompt, on_error=args.on_error)


def build_sft_datasets(args: argparse.Namespace, tokenizer, num_samples: list[int]) -> list:
    """Train/valid/test SFT datasets (None for a split without data)."""
    config = sft_dataset_config(args, tokenizer)
    return BlendedMegatronDatasetBuilder(SFTDataset, num_samples, lambda: True, config).build()


def packed_batch(batch: dict[str, torch.Tensor], seq_length: int
                 ) -> tuple[dict[str, torch.Tensor], PackedSeqParams | None]:
    """The batch as the model takes it, and its ``PackedSeqParams`` (None when not packed)."""
    if "cu_seqlens" not in batch:
        return batch, None
    batch = flatten_batch_for_packed_sequences(dict(batch))
    cu_seqlens = batch["cu_seqlens"][0]
    longest = int(batch["max_seqlen"].max())
    return batch, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens,
                                  cu_seqlens_kv=cu_seqlens, max_seqlen_q=longest,
                                  max_seqlen_kv=longest, tokens_per_sample=seq_length)


def loss_weights(batch: dict[str, torch.Tensor], per_sequence: bool) -> torch.Tensor:
    """Per-token loss weights: the loss mask, or each sequence's mask over its token count."""
    mask = batch["loss_mask"].float()
    if not per_sequence:
        return mask
    if "cu_seqlens" in batch:
        cu_seqlens = batch["cu_seqlens"][0]
        count = cu_seqlens.numel() - 1
        sequences = segment_ids(cu_seqlens, mask.numel()).view(mask.shape)
    else:  # one sample per row
        count = mask.shape[0]
        sequences = torch.arange(count, device=mask.device)[:, None].expand(mask.shape)
    counts = torch.zeros(count, device=mask.device).index_add_(0, sequences.reshape(-1),
                                                                mask.reshape(-1))
    return mask / counts[sequences].clamp(min=1)
