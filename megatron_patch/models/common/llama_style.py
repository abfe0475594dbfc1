"""Weight-mapping table shared by llama-style decoders (Llama, Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.rules import Direct, FusedQKV, GatedMLP, Rule
from megatron_patch.models.common.decoder_args import output_layer_rules

_L = "decoder.layers.*."
_H = "model.layers.*."


def llama_style_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """HF <-> Megatron rules; q/k/v bias and q/k norms follow ``config``."""
    attn = _H + "self_attn."
    rules: list[Rule] = [
        Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Direct("decoder.final_layernorm.weight", "model.norm.weight"),
        Direct(_L + "input_layernorm.weight", _H + "input_layernorm.weight"),
        FusedQKV(_L + "self_attention.linear_qkv.weight",
                 attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
        Direct(_L + "self_attention.linear_proj.weight", attn + "o_proj.weight"),
        Direct(_L + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight"),
        GatedMLP(_L + "mlp.linear_fc1.weight",
                 _H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        Direct(_L + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight"),
    ]
    if config.add_qkv_bias:
        rules.append(FusedQKV(_L + "self_attention.linear_qkv.bias",
                              attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"))
    if config.qk_layernorm:
        rules += [
            Direct(_L + "self_attention.q_layernorm.weight", attn + "q_norm.weight"),
            Direct(_L + "self_attention.k_layernorm.weight", attn + "k_norm.weight"),
        ]
    return rules + output_layer_rules(tie_embeddings)
