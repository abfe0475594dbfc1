"""The training loop on Megatron-Core: forward/backward schedules, optimizer, eval, checkpoints.

Runs unchanged on GPUs (nccl) and CPUs (gloo). Checkpoints are written and read by
``megatron.training.checkpointing`` so they are Megatron-LM checkpoints (``torch_dist`` by
default, ``latest_checkpointed_iteration.txt`` + ``iter_0000100/``), with optimizer, scheduler
and RNG state, and saved crash-safe (:mod:`.checkpoint`); exit signals, non-finite losses and
gradients and loss spikes are handled per iteration (:mod:`.resilience`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank, get_model_config
from megatron.training.checkpointing import checkpoint_exists
from megatron.training.global_vars import get_args
from megatron.training.training import (
    get_megatron_optimizer_config,
    get_model,
    get_optimizer_param_scheduler,
    num_floating_point_operations,
)
from megatron.training.utils import print_rank_0

from megatron_patch.models.builder import gpt_model_provider, transformer_config_from_args
from megatron_patch.models.common.lora import settings_from_args
from megatron_patch.models.init import init_layout_invariant
from megatron_patch.runtime.float8 import ACCURACY_WARNING, convert_linears_to_float8
from megatron_patch.runtime.gpu_fast_paths import (
    apply_gpu_fast_paths,
    compile_transformer_layers,
    use_fused_adam,
)
from megatron_patch.training.checkpoint import load_megatron_checkpoint, save_checkpoint_atomic
from megatron_patch.training.logging import TrainingLogger
from megatron_patch.training.lora import add_lora, report_lora
from megatron_patch.training.lora_checkpoint import is_adapter_checkpoint, use_base_checkpoint
from megatron_patch.training.moe_metrics import moe_router_losses
from megatron_patch.training.resilience import (
    SpikeDetector,
    disable_ddp_nan_check,
    exit_signal_name,
    exit_signal_received,
    handle_nonfinite,
    nonfinite_ranks,
)

ForwardStep = Callable[[Iterator | None, torch.nn.Module], tuple]


@dataclass
class TrainState:
    """Model, optimizer and schedule of one run."""

    model: list[torch.nn.Module]
    optimizer: object
    scheduler: object
    iteration: int = 0
    flops_so_far: float = 0.0
    # states trained alongside this one (e.g. PPO's critic): saved with each of its checkpoints
    companions: dict[str, TrainState] = field(default_factory=dict)


def setup_model_and_optimizer(
        args: argparse.Namespace,
        extend_model: Callable[[torch.nn.Module], None] | None = None) -> TrainState:
    """Build the (DDP-wrapped) model chunks, optimizer and LR schedule, then load ``--load``.

    ``extend_model(chunk)`` may add modules to each chunk before it is wrapped (e.g. a value
    head); they are trained and checkpointed with the rest.
    """
    fast_paths = apply_gpu_fast_paths()
    config = transformer_config_from_args(args)
    lora = settings_from_args(args)

    def prepare(model: torch.nn.Module) -> None:
        if lora is not None:
            add_lora(model, lora, args)
        if getattr(args, "torchao_float8", None):
            count = convert_linears_to_float8(model, args.torchao_float8)
            print_rank_0(f"> float8 training (torchao {args.torchao_float8}): {count} linears")
            print_rank_0(ACCURACY_WARNING)
        if args.torch_compile_layers:
            compile_transformer_layers(model)
        if extend_model is not None:
            extend_model(model)

    model = get_model(gpt_model_provider(args, extend=prepare,
                                         transformer_engine=False if lora else None),
                      ModelType.encoder_or_decoder)
    disable_ddp_nan_check(model)
    resume = bool(args.load and checkpoint_exists(args.load))
    if lora is not None:  # the base from its checkpoint, the adapters from --load if it has
        resume = is_adapter_checkpoint(args.load)
        if not resume:
            init_layout_invariant(model, config, args.seed,
                                  tied=not args.untie_embeddings_and_output_weights)
        report_lora(model, lora, use_base_checkpoint(model, args))
    elif not resume:  # e.g. a first run with --load = --save
        init_layout_invariant(model, config, args.seed,
                              tied=not args.untie_embeddings_and_output_weights)
    opt_config, overrides = get_megatron_optimizer_config(args)
    optimizer = get_megatron_optimizer(opt_config, model, config_overrides=overrides)
    scheduler = get_optimizer_param_scheduler(optimizer)
    state = TrainState(model, optimizer, scheduler)
    if resume if lora is not None else args.load:  # Megatron's load (also --finetune's)
        state.iteration, state.flops_so_far = load_megatron_checkpoint(
            model, optimizer, scheduler, strict=True
        )
    if fast_paths:
        use_fused_adam(optimizer)
    return state


def lm_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Weighted LM loss sum, its count, and the [sum, count] pair for reporting.

    ``loss_mask`` holds per-token weights, 0/1 for a plain token mask; their (rounded) sum is
    the count the loss is normalised by (Megatron's 3-tuple loss convention).
    """
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(output.float().reshape(-1) * mask)
    tokens = mask.sum().round().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def next_batch(data_iterator: Iterator) -> dict[str, torch.Tensor]:
    """The next micro-batch's tensors, on the GPU when there is one."""
    return {key: value.cuda(non_blocking=True) for key, value in next(data_iterator).items()
            if isinstance(value, torch.Tensor)}


def on_this_cp_rank(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This context-parallel rank's share of every ``[b, s]`` tensor: Megatron's zigzag split
    into ``2 * CP`` chunks (``get_batch_on_this_cp_rank``); the batch itself without CP."""
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return batch
    length = batch["tokens"].shape[1]
    if length % (2 * cp_size):
        raise ValueError(f"context parallelism: sequence length {length} must be divisible by "
                         f"2 * --context-parallel-size = {2 * cp_size}")
    return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False,
                                     cp_group=parallel_state.get_context_parallel_group())


def gpt_forward_step(data_iterator: Iterator | None, model: torch.nn.Module):
    """Megatron forward step for causal LM batches from GPTDataset-style dicts."""
    batch = on_this_cp_rank(next_batch(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss, batch["loss_mask"])


def _reduce_reported(losses: list[dict]) -> dict[str, float]:
    """Sum [value, count] pairs over micro-batches and data-parallel ranks; return means."""
    if not losses:
        return {}
    totals = {key: torch.stack([d[key] for d in losses]).sum(0) for key in losses[0]}
    for value in totals.values():
        torch.distributed.all_reduce(
            value, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    return {key: (v[0] / v[1].clamp(min=1)).item() for key, v in totals.items()}


def _last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def _schedule_shape(args: argparse.Namespace) -> dict[str, int]:
    """Sequence and micro-batch sizes of the activations pipeline stages exchange.

    Packed SFT micro-batches run as one THD sequence of ``micro_batch_size * seq_length``
    tokens (batch dimension 1).
    """
    if args.sft_packing:
        length = args.seq_length * args.micro_batch_size
        return {"seq_length": length, "micro_batch_size": 1, "decoder_seq_length": length}
    return {"seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
            "decoder_seq_length": args.seq_length}


def train_step(state: TrainState, iterators: list, forward_step: ForwardStep,
               args: argparse.Namespace) -> tuple[dict[str, float], bool, float | None]:
    """One optimizer step over a global batch; returns (losses, update_successful, grad_norm)."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=state.model,
        num_microbatches=get_num_microbatches(),
        **_schedule_shape(args),
        forward_only=False,
    )
    if args.check_for_nan_in_loss_and_grad:
        # fp16 gradient overflows are the loss scaler's to skip; the loss is checked regardless
        found = nonfinite_ranks(state.model, losses if _last_stage() else [],
                                check_grads=not args.fp16)
        if found:
            handle_nonfinite(found, state.iteration + 1, args)
            return _reduce_reported(losses if _last_stage() else []), False, None
    update_successful, grad_norm, _ = state.optimizer.step()
    if update_successful:
        state.scheduler.step(increment=args.global_batch_size)
    return (_reduce_reported(losses if _last_stage() else []), update_successful,
            as_float(grad_norm))


def as_float(value: float | torch.Tensor | None) -> float | None:
    """A reported number as a Python float: Transformer Engine's multi-tensor kernels give the
    gradient norm as a one-element tensor, torch's and apex's paths as a float."""
    return None if value is None else float(value)


@torch.no_grad()
def evaluate(state: TrainState, iterators: list, forward_step: ForwardStep,
             args: argparse.Namespace) -> dict[str, float]:
    """Average validation loss over ``--eval-iters`` global batches."""
    for chunk in state.model:
        chunk.eval()
    collected: list[dict] = []
    for _ in range(args.eval_iters):
        collected += get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=state.model,
            num_microbatches=get_num_microbatches(),
            **_schedule_shape(args),
            forward_only=True,
        )
        args.consumed_valid_samples += args.global_batch_size
    for chunk in state.model:
        chunk.train()
    return _reduce_reported(collected if _last_stage() else [])


def _configure_model_hooks(state: TrainState) -> None:
    config = get_model_config(state.model[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = state.optimizer.scale_loss
    config.no_sync_func = [chunk.no_sync for chunk in state.model]
    if len(state.model) == 1:
        config.no_sync_func = config.no_sync_func[0]


def train(state: TrainState, train_iterators: list, valid_iterators: list | None,
          forward_step: ForwardStep, args: argparse.Namespace,
          before_step: Callable[[TrainState], None] | None = None) -> dict[str, float]:
    """Run from ``state.iteration`` to ``--train-iters``; returns the last logged losses.

    ``before_step(state)`` runs at the start of every iteration (e.g. RLHF rollouts filling
    the micro-batches the train iterators yield); its time counts in the iteration's.
    """
    _configure_model_hooks(state)
    for chunk in state.model:
        chunk.train()
    logger = TrainingLogger(args)
    spikes = SpikeDetector() if args.check_for_spiky_loss else None
    last: dict[str, float] = {}
    saved_at = state.iteration
    while state.iteration < args.train_iters:
        start = time.time()
        if before_step is not None:
            before_step(state)
        losses, ok, grad_norm = train_step(state, train_iterators, forward_step, args)
        state.iteration += 1
        router_losses = moe_router_losses(args, state.iteration)  # a collective: every rank
        losses = {**losses, **router_losses} if losses else losses
        args.consumed_train_samples += args.global_batch_size
        flops = num_floating_point_operations(args, args.global_batch_size)
        state.flops_so_far += flops
        logger.step(state.iteration, losses, time.time() - start, flops, ok, grad_norm,
                    state.optimizer.get_loss_scale().item(),
                    state.scheduler.get_lr(state.optimizer.param_groups[0]))
        last = losses or last
        if spikes is not None and losses:
            spikes.check(state.iteration, losses)
        if (valid_iterators and args.eval_interval and args.eval_iters
                and state.iteration % args.eval_interval == 0):
            logger.validation(state.iteration, evaluate(state, valid_iterators, forward_step, args))
        # after the evaluation (as in Megatron-LM): the checkpoint counts its validation samples
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save(state)
            saved_at = state.iteration
        if args.exit_interval and state.iteration % args.exit_interval == 0:
            break
        if exit_signal_received():
            print_rank_0(f"received {exit_signal_name(args)} at iteration {state.iteration}: "
                         + ("saving a final checkpoint and " if args.save else "") + "exiting")
            break
    if args.save and saved_at != state.iteration:
        save(state)
    logger.close()
    return last


def save(state: TrainState) -> None:
    """Write a Megatron checkpoint for ``state.iteration``, crash-safe (see :mod:`.checkpoint`).

    Each companion state is saved first, into ``--save/<name>``: when the run's tracker names
    an iteration, its companions' checkpoints of that iteration are complete.
    """
    args = get_args()
    root = args.save
    try:
        for name, companion in state.companions.items():
            args.save = str(Path(root) / name)
            save_checkpoint_atomic(companion, args)
    finally:
        args.save = root
    save_checkpoint_atomic(state, args)
