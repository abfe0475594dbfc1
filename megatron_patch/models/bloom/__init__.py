"""Bloom / BloomZ (``BloomForCausalLM``).

ALiBi instead of position embeddings, a LayerNorm on the word embeddings, LayerNorm with bias,
biases on every linear layer and the tanh GeLU. Bloom's fused ``query_key_value`` interleaves
q, k, v per head, which is Megatron's own layout for multi-head attention, so it maps directly.
Bloom has no maximum length; ``max_position_embeddings`` is set to its 2048 training length.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.mapping.rules import Direct, Rule
from megatron_patch.models.bloom.sizes import BLOOM_SIZES
from megatron_patch.models.common.decoder_args import (
    LAYER,
    WEIGHT_BIAS,
    decoder_args,
    direct_rules,
    field,
    output_layer_rules,
    refuse,
)
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.registry import register_family

TRAINING_LENGTH = 2048


def bloom_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a Bloom ``config.json``."""
    refuse(hf, "apply_residual_connection_post_layernorm", True, False,
           "the residual would be taken after the input norm")
    hidden = field(hf, "hidden_size", "n_embed")
    return decoder_args(
        layers=field(hf, "n_layer", "num_hidden_layers"), hidden=hidden, ffn=4 * hidden,
        heads=field(hf, "n_head", "num_attention_heads"),
        kv_heads=field(hf, "n_head", "num_attention_heads"), vocab=field(hf, "vocab_size"),
        max_positions=TRAINING_LENGTH, norm="LayerNorm",
        eps=field(hf, "layer_norm_epsilon", default=1e-5),
        tied=hf.get("tie_word_embeddings", True), bias=True,
        attention_dropout=field(hf, "attention_dropout", default=0.0),
        hidden_dropout=field(hf, "hidden_dropout", default=0.0),
        init_std=field(hf, "initializer_range", default=0.02),
        position_embedding_type="none", alibi=True, embedding_layernorm=True,
        mlp_activation="gelu_tanh",
    )


def megatron_to_bloom(args: Any) -> HFConfig:
    """Bloom ``config.json`` fields for Megatron arguments."""
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom",
        "hidden_size": args.hidden_size, "n_layer": args.num_layers,
        "n_head": args.num_attention_heads, "vocab_size": args.vocab_size,
        "layer_norm_epsilon": args.layernorm_epsilon,
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "attention_dropout": args.attention_dropout, "hidden_dropout": args.hidden_dropout,
        "initializer_range": args.init_method_std,
        "apply_residual_connection_post_layernorm": False,
    }


def bloom_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """Bloom HF <-> Megatron rules (all biases present)."""
    rules: list[Rule] = [
        Direct("embedding.word_embeddings.weight", "transformer.word_embeddings.weight"),
        *direct_rules("", "transformer.", {
            "embedding.word_embeddings_layernorm": "word_embeddings_layernorm",
            "decoder.final_layernorm": "ln_f"}, WEIGHT_BIAS),
        *direct_rules(LAYER, "transformer.h.*.", {
            "input_layernorm": "input_layernorm",
            "self_attention.linear_qkv": "self_attention.query_key_value",
            "self_attention.linear_proj": "self_attention.dense",
            "pre_mlp_layernorm": "post_attention_layernorm",
            "mlp.linear_fc1": "mlp.dense_h_to_4h",
            "mlp.linear_fc2": "mlp.dense_4h_to_h"}, WEIGHT_BIAS),
    ]
    return rules + output_layer_rules(tie_embeddings)


BLOOM = register_family(
    PatchedFamily(
        name="bloom",
        hf_architectures=("BloomForCausalLM",),
        hf_to_megatron=bloom_to_megatron,
        megatron_to_hf=megatron_to_bloom,
        weight_mappings=bloom_mapping,
        sizes=BLOOM_SIZES,
    )
)
