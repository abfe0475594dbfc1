"""StarCoder / StarCoderBase (``GPTBigCodeForCausalLM``) and StarCoder2 sizes."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import ModelSize


def _bigcode(hidden: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return {"architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode",
            "n_embd": hidden, "n_layer": layers, "n_head": heads, "n_inner": 4 * hidden,
            "n_positions": 8192, "multi_query": True, "vocab_size": 49152,
            "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5,
            "attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
            "initializer_range": 0.02, **extra}


def _starcoder2(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                **extra: Any) -> dict[str, Any]:
    return {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "vocab_size": 49152,
            "max_position_embeddings": 16384, "sliding_window": 4096, "norm_epsilon": 1e-5,
            "use_bias": True, "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.1,
            "residual_dropout": 0.1, "embedding_dropout": 0.1, **extra}


STARCODER_SIZES = (
    ModelSize("starcoder-tiny", "tiny", _bigcode(256, 4, 4, vocab_size=2048, n_positions=2048)),
    ModelSize("starcoderbase-1b", "1B", _bigcode(2048, 24, 16)),
    ModelSize("starcoderbase-3b", "3B", _bigcode(2816, 36, 22)),
    ModelSize("starcoderbase-7b", "7B", _bigcode(4096, 42, 32)),
    ModelSize("starcoder", "15B", _bigcode(6144, 40, 48)),
)
STARCODER2_SIZES = (
    ModelSize("starcoder2-tiny", "tiny", _starcoder2(256, 4, 4, 2, 1024, vocab_size=2048,
                                                     max_position_embeddings=2048,
                                                     sliding_window=None, rope_theta=10000.0)),
    ModelSize("starcoder2-3b", "3B", _starcoder2(3072, 30, 24, 2, 12288,
                                                 rope_theta=999999.4420358813,
                                                 initializer_range=0.018042)),
    ModelSize("starcoder2-7b", "7B", _starcoder2(4608, 32, 36, 4, 18432, rope_theta=1000000.0,
                                                 initializer_range=0.018042)),
    ModelSize("starcoder2-15b", "15B", _starcoder2(6144, 40, 48, 4, 24576, rope_theta=100000.0,
                                                   initializer_range=0.01275,
                                                   tie_word_embeddings=False)),
)
