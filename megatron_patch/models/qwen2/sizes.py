"""Qwen2.5 sizes (``Qwen2ForCausalLM``): q/k/v bias; the small sizes tie their embeddings."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config


def _qwen2(*shape: int, **extra: Any) -> dict[str, Any]:
    return decoder_config("Qwen2ForCausalLM", "qwen2", *shape,
                          **{"rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                             "use_sliding_window": False, **extra})


_QWEN25_SMALL = {"vocab_size": 151936, "tie_word_embeddings": True}
_QWEN25_LARGE = {"vocab_size": 152064, "tie_word_embeddings": False,
                 "max_position_embeddings": 131072}

QWEN2_SIZES = (
    ModelSize("qwen2-tiny", "tiny", _qwen2(256, 4, 4, 2, 688, **{**TINY,
                                                                 "tie_word_embeddings": True})),
    ModelSize("qwen2.5-0.5b", "0.5B", _qwen2(896, 24, 14, 2, 4864, max_position_embeddings=32768,
                                             **_QWEN25_SMALL)),
    ModelSize("qwen2.5-1.5b", "1.5B", _qwen2(1536, 28, 12, 2, 8960,
                                             max_position_embeddings=131072, **_QWEN25_SMALL)),
    ModelSize("qwen2.5-3b", "3B", _qwen2(2048, 36, 16, 2, 11008, max_position_embeddings=32768,
                                         **_QWEN25_SMALL)),
    ModelSize("qwen2.5-7b", "7B", _qwen2(3584, 28, 28, 4, 18944, **_QWEN25_LARGE)),
    ModelSize("qwen2.5-14b", "14B", _qwen2(5120, 48, 40, 8, 13824, rms_norm_eps=1e-5,
                                           **_QWEN25_LARGE)),
    ModelSize("qwen2.5-32b", "32B", _qwen2(5120, 64, 40, 8, 27648, rms_norm_eps=1e-5,
                                           **_QWEN25_LARGE)),
    ModelSize("qwen2.5-72b", "72B", _qwen2(8192, 80, 64, 8, 29568, rms_norm_eps=1e-5,
                                           **_QWEN25_LARGE)),
)
