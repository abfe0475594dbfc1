"""Mistral sizes (``MistralForCausalLM``); v0.1 slides a 4096-token window, v0.3 does not."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config


def _mistral(*shape: int, **extra: Any) -> dict[str, Any]:
    return decoder_config("MistralForCausalLM", "mistral", *shape,
                          **{"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "head_dim": 128,
                             **extra})


MISTRAL_SIZES = (
    ModelSize("mistral-tiny", "tiny", _mistral(256, 4, 4, 2, 688, **{
        **TINY, "head_dim": 64, "sliding_window": 64})),
    ModelSize("mistral-7b-v0.1", "7B-v0.1", _mistral(
        4096, 32, 32, 8, 14336, vocab_size=32000, max_position_embeddings=32768,
        rope_theta=10000.0, sliding_window=4096)),
    ModelSize("mistral-7b", "7B", _mistral(  # Mistral-7B-v0.3
        4096, 32, 32, 8, 14336, vocab_size=32768, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None)),
)
