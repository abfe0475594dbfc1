"""Helpers of comparisons that run on every rank: this rank's device, a maximum over ranks."""

from __future__ import annotations

import torch


def rank_device() -> torch.device:
    """Where Megatron's tensors live (and what the collectives need): the GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def max_abs_diff(logits: torch.Tensor | None, reference: torch.Tensor) -> float:
    """Max |logits - reference| over the HF vocabulary, reduced over all ranks."""
    diff = torch.zeros((), device=reference.device)
    if logits is not None:
        diff = (logits[..., : reference.shape[-1]] - reference).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return float(diff)
