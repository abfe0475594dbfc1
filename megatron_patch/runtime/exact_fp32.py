"""Exact fp32 matrix products on GPUs, for the commands that compare against HF in fp32.

Transformer Engine computes fp32 GEMMs on TF32 tensor cores (cuBLASLt compute type
``FAST_TF32``, whatever ``torch.backends.cuda.matmul.allow_tf32`` says): about 1e-3 relative
error per product, over the 1e-4 logits tolerance, and enough to flip a mixture-of-experts
router's top-k choice between near-tied experts. ``NVIDIA_TF32_OVERRIDE=0`` makes every NVIDIA
library compute fp32 in fp32; it must be in the environment when the process starts, so these
commands re-execute themselves with it where a GPU is visible.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"


def exact_fp32_argv(command: str, argv: Sequence[str]) -> list[str]:
    """The interpreter command line running ``megatron-patch command argv`` again."""
    return [sys.executable, "-m", "megatron_patch.cli", command, *argv]


def restart_with_exact_fp32(command: str, argv: Sequence[str]) -> None:
    """Re-execute ``megatron-patch command argv`` with TF32 off when a GPU is visible and the
    environment does not yet say how fp32 is computed; otherwise return (CPU, or already set)."""
    if TF32_OVERRIDE in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"megatron-patch {command}: fp32 comparison: restarting with {TF32_OVERRIDE}=0 "
          "(Transformer Engine's fp32 GEMMs would run in TF32)", file=sys.stderr, flush=True)
    os.execve(sys.executable, exact_fp32_argv(command, argv), {**os.environ, TF32_OVERRIDE: "0"})
