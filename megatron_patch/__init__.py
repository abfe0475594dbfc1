"""megatron-patch: train open LLM families on unmodified NVIDIA Megatron-Core.

Public API (stable): :func:`get_family` / :func:`registered_families` (model families),
:func:`build_gpt_model` (a Megatron-Core model for a family from Megatron arguments) and the
conversion functions in :mod:`megatron_patch.conversion`.
"""

import logging
import warnings

# Megatron-Core announces each missing optional library (TE, apex) with a warning at import time;
# megatron-patch detects them itself (runtime.backends) and picks torch-native paths instead.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|transformer-engine)")
# torch notes at import that a CPU-only machine has no CUDA runtime; that is the CPU path.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

__version__ = "0.1.0"

from megatron_patch.runtime.one_cudnn import share_torch_cudnn_with_transformer_engine  # noqa: E402

share_torch_cudnn_with_transformer_engine()  # before Megatron-Core imports Transformer Engine

from megatron_patch.models.registry import get_family, registered_families  # noqa: E402

__all__ = ["__version__", "get_family", "registered_families"]
