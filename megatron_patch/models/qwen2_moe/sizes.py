"""Qwen2-MoE sizes (``Qwen2MoeForCausalLM``)."""

from __future__ import annotations

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config

# The released Qwen-MoE models' router settings (training only).
QWEN_MOE_ROUTER = {"output_router_logits": False, "router_aux_loss_coef": 0.001}

QWEN2_MOE_SIZES = (
    ModelSize("qwen2-moe-tiny", "tiny", decoder_config(
        "Qwen2MoeForCausalLM", "qwen2_moe", 256, 4, 4, 2, 512, moe_intermediate_size=128,
        shared_expert_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        use_sliding_window=False, tie_word_embeddings=False, **TINY)),
    ModelSize("qwen2-57b-a14b", "57B-A14B", decoder_config(
        "Qwen2MoeForCausalLM", "qwen2_moe", 3584, 28, 28, 4, 18944, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=False, **QWEN_MOE_ROUTER)),
)
