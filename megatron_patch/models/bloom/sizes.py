"""Bloom sizes (``BloomForCausalLM``)."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import ModelSize


def _bloom(hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": hidden,
            "n_layer": layers, "n_head": heads, "vocab_size": 250880, "layer_norm_epsilon": 1e-5,
            "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
            "hidden_dropout": 0.0, "initializer_range": 0.02, **extra}


BLOOM_SIZES = (
    ModelSize("bloom-tiny", "tiny", _bloom(256, 4, 4, vocab_size=2048)),
    ModelSize("bloom-560m", "560M", _bloom(1024, 24, 16)),
    ModelSize("bloom-1b1", "1B1", _bloom(1536, 24, 16)),
    ModelSize("bloom-1b7", "1B7", _bloom(2048, 24, 16)),
    ModelSize("bloom-3b", "3B", _bloom(2560, 30, 32)),
    ModelSize("bloom-7b1", "7B1", _bloom(4096, 30, 32)),
    ModelSize("bloom-176b", "176B", _bloom(14336, 70, 112)),
)
