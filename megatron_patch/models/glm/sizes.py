"""GLM-4 (``GlmForCausalLM``) and ChatGLM2/3 / glm-4-9b (``ChatGLMModel``) sizes."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config


def _chatglm(layers: int, vocab: int, **extra: Any) -> dict[str, Any]:
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": layers,
            "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
            "num_attention_heads": 32, "multi_query_attention": True,
            "multi_query_group_num": 2, "padded_vocab_size": vocab, "seq_length": 8192,
            "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True,
            "add_bias_linear": False, "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False, "original_rope": True,
            "attention_dropout": 0.0, "hidden_dropout": 0.0, **extra}


GLM_SIZES = (
    ModelSize("glm-tiny", "tiny", decoder_config(
        "GlmForCausalLM", "glm", 256, 4, 4, 2, 688, head_dim=64, partial_rotary_factor=0.5,
        attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False, **TINY)),
    ModelSize("glm-4-9b", "9B", decoder_config(  # THUDM/glm-4-9b-hf
        "GlmForCausalLM", "glm", 4096, 40, 32, 2, 13696, head_dim=128,
        partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1.5625e-07,
        rope_theta=10000.0, vocab_size=151552, max_position_embeddings=8192,
        tie_word_embeddings=False)),
)
CHATGLM_SIZES = (
    ModelSize("chatglm-tiny", "tiny", {
        **_chatglm(4, 2048), "hidden_size": 256, "ffn_hidden_size": 688, "kv_channels": 64,
        "num_attention_heads": 4, "seq_length": 2048}),
    ModelSize("chatglm2-6b", "chatglm2-6B", _chatglm(28, 65024, seq_length=32768)),
    ModelSize("chatglm3-6b", "6B", _chatglm(28, 65024)),
    ModelSize("glm-4-9b-chatglm", "glm4-9B", _chatglm(40, 151552, layernorm_epsilon=1.5625e-07)),
)
