"""FP8 training of Megatron-Core's tensor-parallel linears through torchao, for GPUs without TE.

With Transformer Engine installed, ``--fp8-format`` keeps Megatron's own TE path. Without it,
:func:`convert_linears_to_float8` gives every ``ColumnParallelLinear``/``RowParallelLinear`` of
the transformer layers a forward that runs its three GEMMs (output, input gradient, weight
gradient) in float8 with torchao's dynamic scaling (``tensorwise``: one scale per tensor, the
cuBLAS kernel; ``rowwise``: one per row, the CUTLASS kernel). Weights, gradients and optimizer
state stay as they are (bf16 params, fp32 main grads), so checkpoints are unchanged.

Tensor/sequence parallelism keeps Megatron's semantics: the sequence-parallel all-gather (with
its reduce-scatter in backward) and the input-gradient all-reduce are applied around the float8
matmul with Megatron's own autograd-aware collectives. The output layer stays in bf16, as is
usual for float8 recipes. ``emulate=True`` (used on CPUs) computes in high precision after
float8 rounding, which is what the CPU tests check.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

RECIPES = ("tensorwise", "rowwise")
# logged with every torchao float8 run until its accuracy matches Transformer Engine's
ACCURACY_WARNING = (
    "WARNING: torchao float8 is not yet shown to train like bf16: over 300 steps of the 1.1B "
    "shape on the shipped corpus (fp8_loss_parity, H100) its loss ended 2.98% above bf16's, "
    "Transformer Engine's fp8 0.27%; check a bf16 run of your model before relying on it")


class Float8Unavailable(RuntimeError):
    """torchao's float8 training cannot run here."""


def _torchao_config(recipe: str, emulate: bool):
    try:
        from torchao.float8.config import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as exc:
        raise Float8Unavailable(
            "--fp8-format without Transformer Engine needs torchao "
            "(pip install 'megatron-patch[fp8]' or torchao>=0.14)") from exc
    if recipe not in RECIPES:
        raise Float8Unavailable(f"float8 recipe {recipe!r}: expected one of {RECIPES}")
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    # Float8Linear derives the per-GEMM settings (fast accumulation for the output GEMM only).
    mm_config = Float8Linear(16, 16, bias=False, device="meta", config=config).linear_mm_config
    return config, mm_config


def _float8_forward(config, mm_config, input, weight, bias=None, *, allreduce_dgrad=False,
                    sequence_parallel=False, tp_group=None, **_megatron_only):
    """Megatron's linear forward (``_forward_impl`` signature) with float8 GEMMs."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    if sequence_parallel:
        input = gather_from_sequence_parallel_region(input, group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    output = matmul_with_hp_or_float8_args.apply(input, weight.t(), mm_config, config)
    return output if bias is None else output + bias


def convert_linears_to_float8(model: torch.nn.Module, recipe: str = "tensorwise",
                              emulate: bool | None = None) -> int:
    """Run the transformer layers' parallel linears in float8; returns how many were converted.

    Linears whose local weight dimensions are not multiples of 16 (the float8 GEMM's alignment)
    stay in bf16. ``emulate`` defaults to True without CUDA.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_layer import TransformerLayer

    emulate = not torch.cuda.is_available() if emulate is None else emulate
    if not emulate and torch.cuda.get_device_capability() < (8, 9):
        raise Float8Unavailable(
            f"float8 GEMMs need compute capability 8.9+ (Ada/Hopper); this GPU is "
            f"{torch.cuda.get_device_name()}")
    config, mm_config = _torchao_config(recipe, emulate)
    forward = partial(_float8_forward, config, mm_config)
    converted = 0
    for layer in (m for m in model.modules() if isinstance(m, TransformerLayer)):
        for linear in layer.modules():
            if not isinstance(linear, ColumnParallelLinear | RowParallelLinear):
                continue
            if linear.weight is None or any(d % 16 for d in linear.weight.shape):
                continue
            linear._forward_impl = forward
            converted += 1
    return converted
