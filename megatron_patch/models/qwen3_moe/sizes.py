"""Qwen3-MoE sizes (``Qwen3MoeForCausalLM``)."""

from __future__ import annotations

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config
from megatron_patch.models.qwen2_moe.sizes import QWEN_MOE_ROUTER

QWEN3_MOE_SIZES = (
    ModelSize("qwen3-moe-tiny", "tiny", decoder_config(
        "Qwen3MoeForCausalLM", "qwen3_moe", 256, 4, 4, 2, 512, head_dim=64,
        moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, attention_bias=False,
        use_sliding_window=False, tie_word_embeddings=False, **TINY)),
    ModelSize("qwen3-30b-a3b", "30B-A3B", decoder_config(
        "Qwen3MoeForCausalLM", "qwen3_moe", 2048, 48, 32, 4, 6144, head_dim=128,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=False, use_sliding_window=False, tie_word_embeddings=False,
        **QWEN_MOE_ROUTER)),
    ModelSize("qwen3-235b-a22b", "235B-A22B", decoder_config(
        "Qwen3MoeForCausalLM", "qwen3_moe", 4096, 94, 64, 4, 12288, head_dim=128,
        moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=False, use_sliding_window=False, tie_word_embeddings=False,
        **QWEN_MOE_ROUTER)),
)
