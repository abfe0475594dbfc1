"""Context parallelism without Transformer Engine: attention over all-gathered keys/values.

Megatron splits every sequence into ``2 * cp`` equal chunks and gives context-parallel rank
``r`` chunks ``r`` and ``2 * cp - 1 - r`` (``get_batch_on_this_cp_rank``: the zigzag that
balances causal work); rotary embeddings follow the same split. Every rank gathers the keys
and values of the whole sequence over the CP group (the backward pass reduce-scatters their
gradients), puts them back in sequence order and attends its own queries under a causal mask
built from their global positions. Keys/values then take full-sequence memory on every rank
(as in Llama 3's all-gather context parallelism); everything else is ``1 / cp``.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def _chunk_owners(cp_size: int) -> list[int]:
    """Sequence chunk held in each slot of the rank-ordered gather: r, 2cp-1-r for every r."""
    return [chunk for rank in range(cp_size) for chunk in (rank, 2 * cp_size - 1 - rank)]


def local_positions(local_length: int, cp_size: int, cp_rank: int,
                    device: torch.device) -> torch.Tensor:
    """Global sequence positions of this CP rank's ``local_length`` tokens."""
    if local_length % 2:
        raise ValueError(f"context parallelism needs an even local sequence length, got "
                         f"{local_length}; make --seq-length divisible by 2 * CP")
    chunk = local_length // 2
    starts = (cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


def gather_sequence(tensor: torch.Tensor, group: torch.distributed.ProcessGroup) -> torch.Tensor:
    """This rank's zigzag ``[s_local, ...]`` -> the whole ``[cp * s_local, ...]`` in order."""
    cp_size = group.size()
    gathered = gather_from_sequence_parallel_region(tensor, tensor_parallel_output_grad=True,
                                                    group=group)
    slots = gathered.view(2 * cp_size, tensor.shape[0] // 2, *tensor.shape[1:])
    order = torch.tensor(_chunk_owners(cp_size)).argsort().to(tensor.device)
    return slots.index_select(0, order).flatten(0, 1)
