"""Mixtral sizes (``MixtralForCausalLM``)."""

from __future__ import annotations

from megatron_patch.models.common.sizes import TINY, ModelSize, decoder_config

MIXTRAL_SIZES = (
    ModelSize("mixtral-tiny", "tiny", decoder_config(
        "MixtralForCausalLM", "mixtral", 256, 4, 4, 2, 256, num_local_experts=4,
        num_experts_per_tok=2, rms_norm_eps=1e-5, tie_word_embeddings=False, **TINY)),
    ModelSize("mixtral-8x7b", "8x7B", decoder_config(
        "MixtralForCausalLM", "mixtral", 4096, 32, 32, 8, 14336, num_local_experts=8,
        num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.02)),
)
