"""``pretrain`` entry point: Megatron-LM flags in, a trained Megatron checkpoint out."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_patch.arguments import parse_training_args
from megatron_patch.models.vocab import resolve_padded_vocab
from megatron_patch.training.checkpoint import check_checkpoint_before_load
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.loop import (
    ForwardStep,
    gpt_forward_step,
    setup_model_and_optimizer,
    train,
)
from megatron_patch.training.pretrain_data import (
    build_pretrain_datasets,
    data_iterator,
    train_valid_test_num_samples,
)
from megatron_patch.utils.metadata import checkpoint_metadata

# (args, tokenizer, [train, valid, test] sample counts) -> [train, valid, test] datasets
DatasetsBuilder = Callable[[argparse.Namespace, object, list[int]], list]


@dataclass(frozen=True)
class MockDataTokenizer:
    """What mock-token pretraining needs of a tokenizer: a vocabulary size and an EOD id."""

    vocab_size: int

    @property
    def eod(self) -> int:
        """End-of-document id (the last id)."""
        return self.vocab_size - 1

    @property
    def pad(self) -> int:
        """Padding id (mock data is never padded; same as EOD)."""
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        """Identity used by Megatron's dataset cache keys."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}


def build_run_tokenizer(args: argparse.Namespace):
    """The tokenizer named by ``--patch-tokenizer-type`` (mock-data runs may name none)."""
    if args.patch_tokenizer_type is None:
        if args.dataset == "mock" and args.vocab_size:
            return MockDataTokenizer(args.vocab_size)
        raise ValueError("--patch-tokenizer-type is required (e.g. HFTokenizer, TinyTokenizer)")
    from megatron_patch.tokenizer import build_tokenizer

    path = args.patch_tokenizer_path or args.hf_config_path or args.load
    return build_tokenizer(args.patch_tokenizer_type, path, args.extra_vocab_size)


def set_padded_vocab(args: argparse.Namespace, tokenizer) -> None:
    """Set ``args.padded_vocab_size`` from tokenizer, HF rows and checkpoint metadata.

    The tokenizer's own size is kept in ``args.tokenizer_vocab_size`` (saved with the
    checkpoint's arguments, so a resumed run can check it uses the same vocabulary).
    """
    args.tokenizer_vocab_size = getattr(tokenizer, "base_vocab_size", None) or getattr(
        tokenizer, "vocab_size", None)
    meta = checkpoint_metadata(args.load) if args.load else None
    args.padded_vocab_size = resolve_padded_vocab(
        tokenizer_vocab=tokenizer.vocab_size if tokenizer is not None else None,
        model_rows=args.vocab_size,
        extra_vocab=0,
        divisible_by=args.make_vocab_size_divisible_by,
        tp_size=args.tensor_model_parallel_size,
        recorded=meta.get("padded_vocab_size") if meta else None,
    )


def chunk_iterators(dataset, args: argparse.Namespace) -> list:
    """One data iterator per virtual-pipeline model chunk (they must advance independently)."""
    chunks = args.virtual_pipeline_model_parallel_size or 1
    return [data_iterator(dataset, args, args.consumed_train_samples) for _ in range(chunks)]


def run_training(args: argparse.Namespace, build_datasets: DatasetsBuilder,
                 forward_step: ForwardStep) -> dict[str, float]:
    """Initialise, build model and data, train; returns the last logged losses (last rank).

    Shared by the entry points: ``build_datasets(args, tokenizer, num_samples)`` returns the
    train/valid/test datasets, ``forward_step`` is Megatron's forward step function.
    """
    initialize(args)
    tokenizer = build_run_tokenizer(args)
    set_padded_vocab(args, tokenizer)
    check_checkpoint_before_load(args)
    state = setup_model_and_optimizer(args)
    train_ds, valid_ds, _ = build_datasets(args, tokenizer, train_valid_test_num_samples(args))
    valid_iterators = None
    if valid_ds is not None and args.eval_iters > 0:
        valid_iterators = [data_iterator(valid_ds, args, args.consumed_valid_samples)
                           for _ in range(args.virtual_pipeline_model_parallel_size or 1)]
    losses = train(state, chunk_iterators(train_ds, args), valid_iterators, forward_step, args)
    teardown_parallel_state()
    return losses


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Pretrain a causal LM; returns the last logged losses (on the last rank)."""
    return run_training(parse_training_args(argv), build_pretrain_datasets, gpt_forward_step)


if __name__ == "__main__":
    main()
