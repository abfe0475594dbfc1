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


def flash_attention_backend(backends: Backends) -> tuple[str | None, str]:
    """Megatron's ``--attention-backend`` for a flash-attention request, and what runs it.

    Transformer Engine's ``flash`` backend needs the flash-attn package; without it TE's
    ``fused`` backend (cuDNN's flash-attention kernels) is the fastest. Without TE the
    torch-native attention (SDPA) ignores the flag: None.
    """
    if not backends.transformer_engine:
        return None, "torch SDPA attention (cuDNN/flash kernels on a GPU)"
    if backends.flash_attn:
        return "flash", "flash-attn through Transformer Engine"
    return "fused", ("Transformer Engine's fused attention (cuDNN flash-attention kernels; "
                     "flash-attn is not installed)")
