"""Process start-up: devices, torch.distributed, Megatron-Core parallel state and seeds."""

from __future__ import annotations

import argparse
import os
import random
from datetime import timedelta

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)
from megatron.training.global_vars import set_args
from torch.distributed import distributed_c10d

from megatron_patch.runtime.backends import available_backends
from megatron_patch.runtime.cpu_compat import apply_cpu_compat
from megatron_patch.training.resilience import install_exit_signal_handler


def initialize_distributed(args: argparse.Namespace) -> None:
    """Start torch.distributed (nccl on GPUs, gloo on CPUs) and Megatron's parallel groups."""
    backends = available_backends()
    if not backends.cuda:
        apply_cpu_compat()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.world_size)))
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=backends.distributed_backend,
            world_size=args.world_size,
            rank=args.rank,
            timeout=timedelta(minutes=args.distributed_timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            distributed_timeout_minutes=args.distributed_timeout_minutes,
            order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
        )


def set_random_seeds(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(args: argparse.Namespace) -> None:
    """Everything a training or inference process needs before building the model."""
    set_args(args)
    install_exit_signal_handler(args)
    initialize_distributed(args)
    set_random_seeds(args.seed)
    init_num_microbatches_calculator(
        args.rank,
        args.rampup_batch_size,
        args.global_batch_size,
        args.micro_batch_size,
        args.data_parallel_size,
        args.decrease_batch_size_if_needed,
    )


def teardown_parallel_state() -> None:
    """Undo ``initialize``'s parallel state, freeing its process groups (not the world group).

    Megatron's ``destroy_model_parallel`` only forgets its groups; their gloo/NCCL communicators
    (and gloo's threads) stay alive. Processes that set up several layouts in turn (verify,
    tests) would otherwise accumulate thousands of threads.
    """
    world = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    subgroups = [] if world is None else [
        group for group in list(distributed_c10d._world.pg_map) if group is not world]
    parallel_state.destroy_model_parallel()
    destroy_num_microbatches_calculator()
    for group in subgroups:
        if group in distributed_c10d._world.pg_map:  # destroying one may free its aliases
            torch.distributed.destroy_process_group(group)
