"""What every RLHF entry point shares: flags, set-up, the frozen reference model, forward-only
passes and the per-iteration micro-batch queue. Training itself is
:func:`megatron_patch.training.loop.train` (optimizer, schedules, logging, checkpoints), whose
``before_step`` hook prepares each global batch (reference log-probs, rollouts).

Batch sizes count sequences (rows): ``--micro-batch-size`` rows per micro-batch, as Megatron's
pipeline schedule exchanges them.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model
from megatron.training.training import get_model
from megatron.training.utils import print_rank_0

from megatron_patch.arguments import parse_training_args
from megatron_patch.models.builder import gpt_model_provider
from megatron_patch.training.checkpoint import (
    check_checkpoint_before_load,
    load_megatron_checkpoint,
)
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.loop import TrainState, next_batch, setup_model_and_optimizer, train
from megatron_patch.training.pretrain import build_run_tokenizer, set_padded_vocab

Batch = dict[str, torch.Tensor]


def parse_rlhf_args(argv: Sequence[str] | None, add_flags: Callable[[argparse.ArgumentParser],
                                                                       None],
                    prog: str) -> argparse.Namespace:
    """Megatron + megatron-patch flags plus the entry point's own (``add_flags``) in one
    namespace. ``--ref-load``, ``--train-data`` and ``--on-error`` are common to all."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    parser.add_argument("--train-data", required=True,
                        help="JSONL/JSON/parquet file or directory of training records")
    parser.add_argument("--ref-load", default=None,
                        help="checkpoint of the frozen reference model (default: --load; "
                             "without either, a copy of the initial policy)")
    own, rest = parser.parse_known_args(argv)
    extra = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    add_flags(extra)
    mine, rest = extra.parse_known_args(rest)
    args = parse_training_args(rest)
    for key, value in {**vars(own), **vars(mine)}.items():
        setattr(args, key, value)
    if args.virtual_pipeline_model_parallel_size:
        raise ValueError(f"{prog}: virtual pipeline stages are not supported; drop "
                         "--num-layers-per-virtual-pipeline-stage")
    if args.context_parallel_size > 1:
        raise ValueError(f"{prog}: --context-parallel-size > 1 is not supported")
    return args


def setup(args: argparse.Namespace,
          extend_model: Callable[[torch.nn.Module], None] | None = None
          ) -> tuple[TrainState, object, int]:
    """Initialise, build the policy (and optimizer) and load ``--load``.

    Returns the train state, the tokenizer and the number of real vocabulary rows.
    """
    initialize(args)
    tokenizer = build_run_tokenizer(args)
    set_padded_vocab(args, tokenizer)
    check_checkpoint_before_load(args)
    state = setup_model_and_optimizer(args, extend_model)
    return state, tokenizer, min(int(tokenizer.vocab_size), args.padded_vocab_size)


@contextlib.contextmanager
def _overridden(args: argparse.Namespace, **values) -> Iterator[None]:
    missing = object()
    saved = {key: getattr(args, key, missing) for key in values}
    for key, value in values.items():
        setattr(args, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is missing:
                delattr(args, key)
            else:
                setattr(args, key, value)


def build_frozen(args: argparse.Namespace, source: str,
                 extend_model: Callable[[torch.nn.Module], None] | None = None
                 ) -> list[torch.nn.Module]:
    """A frozen model sharded like the policy (same architecture flags), weights from the
    checkpoint ``source``; ``extend_model`` adds modules before loading (e.g. a value head)."""
    frozen = get_model(gpt_model_provider(args, extend=extend_model),
                       ModelType.encoder_or_decoder, wrap_with_ddp=False)
    if source:
        with _overridden(args, finetune=True, no_load_optim=True, no_load_rng=True,
                         frozen_load=source, consumed_train_samples=args.consumed_train_samples,
                         consumed_valid_samples=args.consumed_valid_samples):
            load_megatron_checkpoint(frozen, None, None, load_arg="frozen_load")
    for chunk in frozen:
        chunk.eval()
        chunk.requires_grad_(False)
    return frozen


def resumes_own_run(args: argparse.Namespace, policy: TrainState) -> bool:
    """Whether the policy continued this run from its own checkpoint (``--load`` without
    ``--finetune``, past iteration 0) rather than starting from ``--load``'s weights."""
    return bool(args.load and not args.finetune and policy.iteration)


def build_reference(args: argparse.Namespace, policy: TrainState) -> list[torch.nn.Module]:
    """The frozen reference model: ``--ref-load`` (else ``--load``) weights only, else a copy of
    the policy's current weights. A run resumed from its own checkpoint (``--load`` without
    ``--finetune``) needs ``--ref-load``: its ``--load`` holds the trained policy, not the
    reference."""
    if resumes_own_run(args, policy) and not args.ref_load:
        raise ValueError(f"resuming from {args.load} at iteration {policy.iteration}: its weights "
                         "are the trained policy, not the reference; pass --ref-load with the "
                         "checkpoint the run started from")
    source = args.ref_load or args.load
    reference = build_frozen(args, source)
    if not source:
        copy_weights(policy.model, reference)
    print_rank_0(f"> reference model: {source or 'a copy of the initial policy'}")
    return reference


def copy_weights(source: list[torch.nn.Module], target: list[torch.nn.Module]) -> None:
    """Copy the parameters of one model's chunks into another's (same layout; in-process)."""
    with torch.no_grad():
        for src, dst in zip(source, target, strict=True):
            wanted = dict(unwrap_model(dst).named_parameters())
            for name, param in unwrap_model(src).named_parameters():
                if name in wanted:
                    wanted[name].copy_(param)


def forward_only(model: list[torch.nn.Module], batches: list[Batch],
                 forward_step: Callable, args: argparse.Namespace) -> list[dict]:
    """Run ``forward_step`` on each micro-batch without gradients (pipelined); returns the
    reported dicts (on the last pipeline stage, empty elsewhere)."""
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, decoder_seq_length=args.seq_length,
            forward_only=True)
    return out if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else []


def global_batch(data: Iterator) -> list[Batch]:
    """This data-parallel rank's micro-batches of the next global batch, on the device."""
    return [next_batch(data) for _ in range(get_num_microbatches())]


class StepBatches:
    """The train iterator of :func:`~megatron_patch.training.loop.train`: yields the micro-
    batches ``before_step`` prepared for the current iteration."""

    def __init__(self) -> None:
        self.pending: deque[Batch] = deque()

    def fill(self, batches: list[Batch]) -> None:
        """Set the micro-batches of the next iteration."""
        self.pending = deque(batches)

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> Batch:
        if not self.pending:
            raise RuntimeError("the training step asked for more micro-batches than prepared")
        return self.pending.popleft()


def run(state: TrainState, args: argparse.Namespace, forward_step: Callable,
        before_step: Callable[[TrainState, StepBatches], None]) -> dict[str, float]:
    """Train with ``before_step`` filling each iteration's micro-batches; tear down after."""
    batches = StepBatches()
    try:
        return train(state, [batches], None, forward_step, args,
                     before_step=lambda s: before_step(s, batches))
    finally:
        teardown_parallel_state()


def check_even_rows(args: argparse.Namespace, what: str) -> None:
    """Pairs live in one micro-batch: the micro-batch size counts rows and must be even."""
    if args.micro_batch_size % 2:
        raise ValueError(f"{what}: --micro-batch-size counts sequences (a chosen and a rejected "
                         f"row per pair) and must be even, got {args.micro_batch_size}")
