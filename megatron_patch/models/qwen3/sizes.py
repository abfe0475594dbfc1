"""Qwen3 dense sizes (``Qwen3ForCausalLM``): per-head q/k RMSNorm, head_dim 128."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config


def _qwen3(*shape: int, **extra: Any) -> dict[str, Any]:
    return decoder_config("Qwen3ForCausalLM", "qwen3", *shape,
                          **{"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "head_dim": 128,
                             "attention_bias": False, "use_sliding_window": False,
                             "max_position_embeddings": 40960, "vocab_size": 151936, **extra})


QWEN3_SIZES = (
    ModelSize("qwen3-tiny", "tiny", _qwen3(256, 4, 4, 2, 688, **{
        **TINY, "head_dim": 64, "tie_word_embeddings": True})),
    ModelSize("qwen3-0.6b", "0.6B", _qwen3(1024, 28, 16, 8, 3072, tie_word_embeddings=True)),
    ModelSize("qwen3-1.7b", "1.7B", _qwen3(2048, 28, 16, 8, 6144, tie_word_embeddings=True)),
    ModelSize("qwen3-4b", "4B", _qwen3(2560, 36, 32, 8, 9728, tie_word_embeddings=True)),
    ModelSize("qwen3-8b", "8B", _qwen3(4096, 36, 32, 8, 12288, tie_word_embeddings=False)),
    ModelSize("qwen3-14b", "14B", _qwen3(5120, 40, 40, 8, 17408, tie_word_embeddings=False)),
    ModelSize("qwen3-32b", "32B", _qwen3(5120, 64, 64, 8, 25600, tie_word_embeddings=False)),
)
