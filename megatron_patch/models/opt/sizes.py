"""OPT sizes (``OPTForCausalLM``)."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import ModelSize


def _opt(hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": hidden,
            "word_embed_proj_dim": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "ffn_dim": 4 * hidden, "vocab_size": 50272,
            "max_position_embeddings": 2048, "activation_function": "relu",
            "do_layer_norm_before": True, "enable_bias": True, "dropout": 0.1,
            "attention_dropout": 0.0, "init_std": 0.02, "tie_word_embeddings": True, **extra}


OPT_SIZES = (
    ModelSize("opt-tiny", "tiny", _opt(256, 4, 4, vocab_size=2048, dropout=0.0)),
    ModelSize("opt-125m", "125M", _opt(768, 12, 12)),
    ModelSize("opt-1.3b", "1.3B", _opt(2048, 24, 32)),
    ModelSize("opt-2.7b", "2.7B", _opt(2560, 32, 32)),
    ModelSize("opt-6.7b", "6.7B", _opt(4096, 32, 32)),
    ModelSize("opt-13b", "13B", _opt(5120, 40, 40)),
    ModelSize("opt-30b", "30B", _opt(7168, 48, 56)),
    ModelSize("opt-66b", "66B", _opt(9216, 64, 72)),
)
