"""Pretraining data: Megatron-Core GPT datasets (blends, splits) and DP-sharded loaders."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.training.datasets.data_samplers import MegatronPretrainingSampler
from megatron.training.utils.common_utils import get_blend_and_blend_per_split

from megatron_patch.training.resilience import ignore_in_workers


def _check_prefixes(args: argparse.Namespace) -> None:
    paths = [p for p in (args.data_path or []) if not _is_number(p)]
    for split in ("train_data_path", "valid_data_path", "test_data_path"):
        paths += [p for p in (getattr(args, split) or []) if not _is_number(p)]
    for prefix in paths:
        for suffix in (".bin", ".idx"):
            file = Path(prefix + suffix)
            if not file.is_file():
                raise FileNotFoundError(
                    f"--data-path: {file} does not exist; expected a Megatron indexed dataset "
                    f"'{prefix}.bin' + '{prefix}.idx' (make one with `megatron-patch preprocess`)"
                )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def dataset_config_values(args: argparse.Namespace) -> dict:
    """The fields every Megatron-Core dataset config takes, from Megatron's data flags."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return {
        "random_seed": args.seed,
        "sequence_length": args.seq_length,
        "blend": blend,
        "blend_per_split": blend_per_split,
        "split": args.split,
        "num_dataset_builder_threads": args.num_dataset_builder_threads,
        "path_to_cache": args.data_cache_path,
        "mmap_bin_files": args.mmap_bin_files,
    }


def gpt_dataset_config(args: argparse.Namespace, tokenizer) -> GPTDatasetConfig:
    """Megatron-Core dataset config from Megatron's data flags."""
    return GPTDatasetConfig(
        **dataset_config_values(args),
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
    )


def build_pretrain_datasets(args: argparse.Namespace, tokenizer, num_samples: list[int]):
    """Train/valid/test GPT datasets (``--dataset mock`` gives random tokens)."""
    mock = args.dataset == "mock" or args.mock_data
    if not mock:
        _check_prefixes(args)
    config = gpt_dataset_config(args, tokenizer)
    dataset_type = MockGPTDataset if mock else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type, num_samples, lambda: True, config
    ).build()


def train_valid_test_num_samples(args: argparse.Namespace) -> list[int]:
    """Sample counts Megatron needs for each split."""
    train = args.train_iters * args.global_batch_size
    evals = args.train_iters // args.eval_interval + 1 if args.eval_interval else 1
    eval_iters = evals * args.eval_iters
    return [train, eval_iters * args.global_batch_size, args.eval_iters * args.global_batch_size]


def data_iterator(dataset, args: argparse.Namespace, consumed_samples: int) -> Iterator | None:
    """An endless iterator over this data-parallel rank's micro-batches."""
    if dataset is None or len(dataset) == 0:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples % len(dataset),
        micro_batch_size=args.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers,
        collate_fn=getattr(dataset, "collate", None),  # datasets with ragged items batch them
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.num_workers > 0,
        worker_init_fn=partial(ignore_in_workers, args.exit_signal)
        if args.exit_signal_handler else None,
    )

    def cycle() -> Iterator:
        while True:
            yield from loader
            sampler.consumed_samples = 0

    return cycle()
