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
    direct_rules,
    output_layer_rules,
)
from megatron_patch.models.common.hf_config import (
    ATTENTION_DROPOUT,
    HIDDEN_DROPOUT,
    INITIALIZER_RANGE,
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    Arg,
    Field,
    Fixed,
    decoder_fields,
    fields_to_hf,
    fields_to_megatron,
    gpt_ffn_hidden_size,
)
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.registry import register_family

TRAINING_LENGTH = 2048
BLOOM_FIELDS = decoder_fields(
    Fixed("apply_residual_connection_post_layernorm", False,
          why="the residual would be taken after the input norm"),
    Field("n_layer", "num_layers", int, also=("num_hidden_layers",)),
    Field("hidden_size", "hidden_size", int, also=("n_embed",)),
    Arg("ffn_hidden_size", gpt_ffn_hidden_size),
    Field("n_head", "num_attention_heads", int, also=("num_attention_heads",)),
    Arg("max_position_embeddings", TRAINING_LENGTH),
    Field("layer_norm_epsilon", "layernorm_epsilon", float, default=1e-5),
    Arg("add_bias_linear", True),
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    ATTENTION_DROPOUT,
    HIDDEN_DROPOUT,
    INITIALIZER_RANGE,
    Arg("position_embedding_type", "none"),
    Arg("alibi", True),
    Arg("embedding_layernorm", True),
    Arg("mlp_activation", "gelu_tanh"),
)


def bloom_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a Bloom ``config.json``."""
    return fields_to_megatron(hf, BLOOM_FIELDS)


def megatron_to_bloom(args: Any) -> HFConfig:
    """Bloom ``config.json`` fields for Megatron arguments."""
    return {"architectures": ["BloomForCausalLM"], "model_type": "bloom",
            **fields_to_hf(args, BLOOM_FIELDS)}


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
