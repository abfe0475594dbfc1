"""Falcon sizes (``FalconForCausalLM``)."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import ModelSize


def _falcon(hidden: int, layers: int, heads: int, kv_heads: int | None, **extra: Any
            ) -> dict[str, Any]:
    """Falcon; ``kv_heads`` None: Falcon-7B's multi-query layout, else the new decoder."""
    layout = ({"multi_query": True, "new_decoder_architecture": False} if kv_heads is None
              else {"num_kv_heads": kv_heads, "new_decoder_architecture": True})
    return {"architectures": ["FalconForCausalLM"], "model_type": "falcon",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            **layout, "parallel_attn": True, "bias": False, "alibi": False,
            "vocab_size": 65024, "layer_norm_epsilon": 1e-5, "attention_dropout": 0.0,
            "hidden_dropout": 0.0, "initializer_range": 0.02, **extra}


FALCON_SIZES = (
    ModelSize("falcon-tiny", "tiny", _falcon(256, 4, 4, 2, vocab_size=2048,
                                             max_position_embeddings=2048, rope_theta=10000.0)),
    ModelSize("falcon-7b", "7B", _falcon(4544, 32, 71, None)),
    ModelSize("falcon-40b", "40B", _falcon(8192, 60, 128, 8)),
    ModelSize("falcon-180b", "180B", _falcon(14848, 80, 232, 8)),
)
