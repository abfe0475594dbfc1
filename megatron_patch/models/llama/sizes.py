"""Llama 2 / 3 / 3.1 / 3.2 sizes (``LlamaForCausalLM``); MODEL_SIZE 8B/70B/405B are Llama-3.1."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config


def _llama(*shape: int, **extra: Any) -> dict[str, Any]:
    return decoder_config("LlamaForCausalLM", "llama", *shape,
                          **{"rms_norm_eps": 1e-5, "tie_word_embeddings": False, **extra})


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0}
_LLAMA2 = {"vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 10000.0}
_LLAMA3 = {"vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}
_LLAMA31 = {"vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_parameters": _LLAMA3_ROPE}
_LLAMA32 = {**_LLAMA31, "rope_parameters": {**_LLAMA3_ROPE, "factor": 32.0},
            "tie_word_embeddings": True}

LLAMA_SIZES = (
    ModelSize("llama-tiny", "tiny", _llama(256, 4, 4, 2, 688, **TINY)),
    ModelSize("llama2-7b", "7B", _llama(4096, 32, 32, 32, 11008, **_LLAMA2)),
    ModelSize("llama2-13b", "13B", _llama(5120, 40, 40, 40, 13824, **_LLAMA2)),
    ModelSize("llama2-70b", "llama2-70B", _llama(8192, 80, 64, 8, 28672, **_LLAMA2)),
    ModelSize("llama3-8b", "llama3-8B", _llama(4096, 32, 32, 8, 14336, **_LLAMA3)),
    ModelSize("llama3-70b", "llama3-70B", _llama(8192, 80, 64, 8, 28672, **_LLAMA3)),
    ModelSize("llama3.1-8b", "8B", _llama(4096, 32, 32, 8, 14336, **_LLAMA31)),
    ModelSize("llama3.1-70b", "70B", _llama(8192, 80, 64, 8, 28672, **_LLAMA31)),
    ModelSize("llama3.1-405b", "405B", _llama(16384, 126, 128, 8, 53248, **_LLAMA31)),
    ModelSize("llama3.2-1b", "1B", _llama(2048, 16, 32, 8, 8192, head_dim=64, **_LLAMA32)),
    ModelSize("llama3.2-3b", "3B", _llama(3072, 28, 24, 8, 8192, head_dim=128, **_LLAMA32)),
)
