"""Lossless HF <-> Megatron-Core checkpoint conversion, one engine for every model family.

Public API (imported lazily, so importing one submodule does not import them all):

* :func:`convert_hf_to_mcore` - HF model directory -> Megatron release checkpoint
  (``torch_dist`` or legacy), streamed tensor by tensor.
* :func:`convert_mcore_to_hf` - Megatron checkpoint (converted, or saved by training at any
  TP/PP) -> HF model directory loadable with ``AutoModelForCausalLM.from_pretrained``.
* :func:`build_model_from_hf_config` - this rank's Megatron model for an HF model, optionally
  with its weights, on the current Megatron parallel state.

The verifiers that compare a converted checkpoint with transformers are in
:mod:`megatron_patch.conversion.verify`, the ``convert``, ``verify`` and ``card`` commands in
:mod:`megatron_patch.conversion.cli`; both build on this engine, which imports neither.
"""

import importlib

_EXPORTS = {
    "ConversionError": "megatron_patch.conversion.engine",
    "build_model_from_hf_config": "megatron_patch.conversion.hf_model",
    "convert_hf_to_mcore": "megatron_patch.conversion.hf_to_mcore",
    "convert_mcore_to_hf": "megatron_patch.conversion.mcore_to_hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
