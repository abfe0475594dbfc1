"""Torch-native LayerNorm/RMSNorm usable with sequence parallelism.

Megatron-Core's ``WrappedTorchNorm`` refuses ``--sequence-parallel``. The only thing sequence
parallelism needs from a norm is that its parameters carry ``sequence_parallel = True`` so that
``finalize_model_grads`` all-reduces their gradients over the tensor-parallel group; this module
does exactly that and otherwise is ``torch.nn.RMSNorm``/``torch.nn.LayerNorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}


class PatchNorm:
    """Factory matching Megatron's norm-builder signature; returns a torch norm module."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:
        kind = normalization or config.normalization
        if kind not in _NORMS:
            raise ValueError(f"normalization={kind!r} is not supported; use one of {list(_NORMS)}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norms")
        norm = _NORMS[kind](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
