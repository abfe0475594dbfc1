"""Offline generation and perplexity from Megatron checkpoints, at any TP/PP.

Public API (imported lazily, so the command-line entry points start fast):

* :func:`parse_inference_args`, :func:`load_tokenizer`, :func:`load_inference_model` - a
  checkpoint (converted, or saved by training) ready to run on this rank.
* :class:`Generator` and :func:`generate` - batched generation with Megatron-Core's KV cache
  (left padding, CUDA graphs on GPUs); :class:`SamplingParams`; :class:`StopChecker`.
* :func:`read_prompts` / :func:`write_jsonl` - the prompt and completion files.
* :func:`negative_log_likelihood` - summed NLL of token windows (``eval-ppl``).

Command line: ``megatron-patch generate`` and ``megatron-patch eval-ppl``.
"""

import importlib

_EXPORTS = {
    "Generator": "megatron_patch.generation.engine",
    "generate": "megatron_patch.generation.engine",
    "SamplingParams": "megatron_patch.generation.sampling",
    "StopChecker": "megatron_patch.generation.stopping",
    "Completion": "megatron_patch.generation.stopping",
    "read_prompts": "megatron_patch.generation.prompts",
    "write_jsonl": "megatron_patch.generation.prompts",
    "parse_inference_args": "megatron_patch.generation.model",
    "load_tokenizer": "megatron_patch.generation.model",
    "load_inference_model": "megatron_patch.generation.model",
    "negative_log_likelihood": "megatron_patch.generation.perplexity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
