"""DeepSeek-V3 sizes (``DeepseekV3ForCausalLM``)."""

from __future__ import annotations

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config

DEEPSEEK_SIZES = (
    ModelSize("deepseek-tiny", "tiny", decoder_config(
        "DeepseekV3ForCausalLM", "deepseek_v3", 256, 4, 4, 4, 512, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_intermediate_size=128, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, attention_bias=False, rms_norm_eps=1e-6,
        tie_word_embeddings=False, **TINY)),
    ModelSize("deepseek-v3", "671B", decoder_config(
        "DeepseekV3ForCausalLM", "deepseek_v3", 7168, 61, 128, 128, 18432, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1, n_group=8,
        topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, attention_bias=False,
        vocab_size=129280, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096},
        tie_word_embeddings=False)),
)
