"""Run unmodified Megatron-Core on machines without a GPU (gloo backend).

Targets megatron-core 0.19.x. Megatron-Core assumes CUDA in three ways, each handled here and
only when ``torch.cuda.is_available()`` is False (so nothing that works on a GPU is touched):

1. Device placement: tensors are created with ``device=torch.cuda.current_device()`` or
   ``device='cuda'`` and moved with ``.cuda()``. A :class:`torch.overrides.TorchFunctionMode`
   rewrites every CUDA device argument to the CPU, and ``torch.cuda.current_device`` returns 0.
2. Type checks: the optimizers compare ``tensor.type()`` against ``'torch.cuda.FloatTensor'``;
   the mode answers ``tensor.type()`` with the CUDA type name of a CPU tensor.
3. RNG: the model-parallel RNG tracker saves and restores the CUDA generator state. Here it
   uses the CPU generator instead, so dropout/initialisation forks keep Megatron's semantics.
4. Streams and device queries: CUDA streams/events become no-ops (CPU work is serial; MoE's
   alltoall dispatcher creates a stream when it is built) and ``megatron.training``'s
   GPU-architecture probe reports 0.
5. MoE: the alltoall token dispatcher's split sizes become numpy arrays, as its GPU path makes
   them (``all_to_all_single`` rejects tensors there).

``tests/test_cpu_compat.py`` fails if an upstream change makes any of these patches stale.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (int, 'cuda', 'cuda:0', torch.device) to the CPU; keep others."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Torch function mode placing every tensor Megatron-Core asks to put on CUDA on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):  # e.g. RoPE's context-parallel index: no CUDA to pin for
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return func(*args, **kwargs)


def _cpu_get_rng_state(*_args: Any, clone: bool = False, **_kwargs: Any) -> torch.Tensor:
    """CPU stand-in for ``tensor_parallel.random._get_cuda_rng_state``."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    """CPU stand-in for ``tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


class _SerialStream:
    """Stand-in for a CUDA stream/event on the CPU, where all work is already serial."""

    def __init__(self, *_args: Any, **_kwargs: Any):
        pass

    def __getattr__(self, _name: str):
        return lambda *_a, **_k: None

    def record_event(self, *_args: Any, **_kwargs: Any) -> _SerialStream:
        """An already completed event (MoE's alltoall dispatcher synchronizes on it)."""
        return _SerialStream()


def _cpu_manual_seed(seed: int) -> None:
    """CPU stand-in for ``torch.cuda.manual_seed`` (seeds only the CPU generator)."""
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    """Give the ``torch.cuda`` calls Megatron-Core makes on its hot paths a CPU meaning."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.synchronize = lambda *_a, **_k: None
    cuda.Stream = _SerialStream
    cuda.Event = _SerialStream
    cuda.current_stream = _SerialStream
    cuda.default_stream = _SerialStream
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()


class _DropCpuRngWarning(logging.Filter):
    """The tracker warns when the CPU RNG moves inside a fork; on the CPU that is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron_rng() -> None:
    """Point Megatron's RNG tracker helpers at the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_DropCpuRngWarning())


def _patch_megatron_training() -> None:
    """Argument validation asks for the GPU architecture; a CPU has none (reported as 0)."""
    from megatron.training import arguments, utils
    from megatron.training.utils import common_utils

    for module in (arguments, utils, common_utils):
        module.get_device_arch_version = lambda: 0


def _cpu_split_sizes(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU stand-in for the MoE token dispatcher's ``maybe_move_tensor_to_cpu``.

    On a GPU it returns the all-to-all split sizes as numpy arrays, the type
    ``all_to_all_single`` accepts; on the CPU upstream leaves them tensors, which it rejects.
    """
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _patch_megatron_moe() -> None:
    """Let MoE's alltoall token dispatcher hand its split sizes to gloo as on a GPU."""
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_split_sizes


@functools.cache
def _device_mode() -> CudaToCpuMode:
    return CudaToCpuMode()


def apply_cpu_compat() -> bool:
    """Apply the CPU patches once if no GPU is present; return whether they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if not _APPLIED:
        # Megatron's TP/SP validation requires it; it configures CUDA only, so it is inert here.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_megatron_training()
        _patch_megatron_moe()
        _device_mode().__enter__()
        _APPLIED = True
    return True


def cpu_compat_active() -> bool:
    """Whether the CPU compatibility layer is active in this process."""
    return _APPLIED
