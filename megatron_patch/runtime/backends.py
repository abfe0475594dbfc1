"""Which accelerated libraries and devices this process can use."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backends:
    """Availability of the optional fast paths."""

    cuda: bool
    transformer_engine: bool
    apex: bool
    flash_attn: bool

    @property
    def gpu_count(self) -> int:
        """Visible CUDA devices (0 without CUDA)."""
        return torch.cuda.device_count() if self.cuda else 0

    @property
    def distributed_backend(self) -> str:
        """torch.distributed backend: nccl on GPUs, gloo on the CPU."""
        return "nccl" if self.cuda else "gloo"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def available_backends() -> Backends:
    """Detect GPUs, Transformer Engine, apex and flash-attn once per process."""
    return Backends(
        cuda=torch.cuda.is_available(),
        transformer_engine=_installed("transformer_engine"),
        apex=_installed("apex"),
        flash_attn=_installed("flash_attn"),
    )
