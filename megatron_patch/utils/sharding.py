"""Tensor-parallel sharding of unsharded (TP=1) Megatron tensors, and its inverse.

Megatron marks every tensor-parallel parameter with ``partition_dim``; a shard is a contiguous
chunk along it, with one exception: a gated MLP's ``linear_fc1`` stores ``[gate; up]`` and each
rank holds ``[gate_r; up_r]``. The fused QKV layout is grouped per query group, so contiguous
chunks along dim 0 give each rank whole groups; with fewer groups than ranks they are
Megatron-Core's even split of the rows too (its attention all-gathers them and takes its group,
``models/common/head_split.py``).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state


def is_gated_fc1(name: str, gated_linear_unit: bool) -> bool:
    """Whether ``name`` is a gated MLP input projection (``linear_fc1`` with SwiGLU/GeGLU)."""
    return gated_linear_unit and ".linear_fc1." in name


def tp_shard(
    full: torch.Tensor, partition_dim: int, tp_rank: int, tp_size: int, gated: bool = False
) -> torch.Tensor:
    """This rank's shard of an unsharded tensor."""
    if tp_size == 1:
        return full
    if gated:
        halves = torch.chunk(full, 2, dim=partition_dim)
        return torch.cat([h.chunk(tp_size, dim=partition_dim)[tp_rank] for h in halves],
                         dim=partition_dim)
    return full.chunk(tp_size, dim=partition_dim)[tp_rank].contiguous()


def tp_unshard(shards: list[torch.Tensor], partition_dim: int, gated: bool = False) -> torch.Tensor:
    """Inverse of :func:`tp_shard` over all ranks' shards."""
    if len(shards) == 1:
        return shards[0]
    if gated:
        pairs = [torch.chunk(s, 2, dim=partition_dim) for s in shards]
        return torch.cat([torch.cat([p[i] for p in pairs], dim=partition_dim) for i in (0, 1)],
                         dim=partition_dim)
    return torch.cat(shards, dim=partition_dim)


def tensor_parallel_split(param: torch.Tensor) -> tuple[int, int]:
    """(rank, size) of the group splitting ``param`` on this process: expert tensor
    parallelism for routed experts (Megatron marks them ``allreduce=False`` once EP > 1 or
    ETP != TP), tensor parallelism for everything else."""
    if not getattr(param, "allreduce", True):
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())
