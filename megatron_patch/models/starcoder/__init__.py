"""StarCoder / StarCoderBase / SantaCoder (``GPTBigCodeForCausalLM``) and StarCoder2.

GPTBigCode is GPT-2 with multi-query attention: learned absolute positions, LayerNorm with bias,
biases everywhere, tanh GeLU. Its ``c_attn`` holds ``[q; k; v]`` for MQA and per-head
``[q, k, v]`` for MHA (``multi_query: false``); both are Megatron's fused layout. StarCoder2
(``Starcoder2ForCausalLM``) is llama-shaped with GQA and rope, but LayerNorm with bias, biases on
every linear layer, a non-gated tanh-GeLU MLP and a Mistral-style sliding window. Both are
Megatron-Core's standard layer (Transformer Engine modules when installed).
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.mapping.rules import Direct, FusedQKV, Rule
from megatron_patch.models.common.decoder_args import (
    LAYER,
    WEIGHT,
    WEIGHT_BIAS,
    direct_rules,
    output_layer_rules,
    refuse,
)
from megatron_patch.models.common.hf_config import (
    ATTENTION_DROPOUT,
    ATTENTION_HEADS,
    FFN_HIDDEN_SIZE,
    GROUP_QUERY_ATTENTION,
    HIDDEN_SIZE,
    INITIALIZER_RANGE,
    KEY_VALUE_HEADS,
    NUM_LAYERS,
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    Arg,
    Field,
    Fixed,
    decoder_fields,
    fields_to_hf,
    fields_to_megatron,
    gpt_ffn_hidden_size,
    megatron_window,
    mistral_window,
    rope_to_hf,
    rope_to_megatron,
)
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.registry import register_family
from megatron_patch.models.starcoder.sizes import STARCODER2_SIZES, STARCODER_SIZES

# HF activation names -> --mlp-activation, and back.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu"}
_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


def _activation(hf_name: str) -> Field:
    return Field(hf_name, "mlp_activation", to_hf=_HF_ACTIVATION.__getitem__,
                 default="gelu_pytorch_tanh", values=_ACTIVATIONS)


# GPTBigCode's rows; multi-query attention is read below.
BIGCODE_FIELDS = decoder_fields(
    Fixed("scale_attn_weights", True, why="attention scores are always scaled"),
    Field("n_embd", "hidden_size", int, also=("hidden_size",)),
    Field("n_layer", "num_layers", int, also=("num_hidden_layers",)),
    Field("n_head", "num_attention_heads", int, also=("num_attention_heads",)),
    Field("n_inner", "ffn_hidden_size", int, default=gpt_ffn_hidden_size),
    Field("n_positions", "max_position_embeddings", int, also=("max_position_embeddings",),
          default=1024),
    _activation("activation_function"),
    Field("layer_norm_epsilon", "layernorm_epsilon", float, default=1e-5),
    Arg("add_bias_linear", True),
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    INITIALIZER_RANGE,
    Field("attn_pdrop", "attention_dropout", float, default=0.0),
    Field("resid_pdrop", "hidden_dropout", float, default=0.0),
    Arg("position_embedding_type", "learned_absolute"),
)


def bigcode_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a GPTBigCode ``config.json``."""
    refuse(hf, "add_cross_attention", True, False, "decoder-only models only")
    mqa = {"num_query_groups": 1} if hf.get("multi_query", True) else {}
    return fields_to_megatron(hf, BIGCODE_FIELDS, **mqa)


def megatron_to_bigcode(args: Any) -> HFConfig:
    """GPTBigCode ``config.json`` fields for Megatron arguments."""
    return {
        "architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode",
        **fields_to_hf(args, BIGCODE_FIELDS),
        "multi_query": args.group_query_attention and args.num_query_groups == 1,
        "embd_pdrop": args.hidden_dropout,
    }


def bigcode_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """GPTBigCode HF <-> Megatron rules."""
    rules: list[Rule] = [
        Direct("embedding.word_embeddings.weight", "transformer.wte.weight"),
        Direct("embedding.position_embeddings.weight", "transformer.wpe.weight"),
        *direct_rules("decoder.", "transformer.", {"final_layernorm": "ln_f"}, WEIGHT_BIAS),
        *direct_rules(LAYER, "transformer.h.*.", {
            "input_layernorm": "ln_1",
            "self_attention.linear_qkv": "attn.c_attn",
            "self_attention.linear_proj": "attn.c_proj",
            "pre_mlp_layernorm": "ln_2",
            "mlp.linear_fc1": "mlp.c_fc",
            "mlp.linear_fc2": "mlp.c_proj"}, WEIGHT_BIAS),
    ]
    return rules + output_layer_rules(tie_embeddings)


# StarCoder2's rows; the sliding window and rope are read below.
STARCODER2_FIELDS = decoder_fields(
    HIDDEN_SIZE,
    ATTENTION_HEADS,
    FFN_HIDDEN_SIZE,
    NUM_LAYERS,
    KEY_VALUE_HEADS,
    GROUP_QUERY_ATTENTION,
    _activation("hidden_act"),
    Field("max_position_embeddings", "max_position_embeddings", int, default=4096),
    Field("norm_epsilon", "layernorm_epsilon", float, default=1e-5),
    Field("use_bias", "add_bias_linear", bool, default=True),
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    ATTENTION_DROPOUT,
    Field("residual_dropout", "hidden_dropout", float, default=0.0),
    INITIALIZER_RANGE,
)


def starcoder2_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a StarCoder2 ``config.json``."""
    window = mistral_window(hf)
    return {**fields_to_megatron(hf, STARCODER2_FIELDS),
            "window_size": None if window is None else (window - 1, 0), **rope_to_megatron(hf)}


def megatron_to_starcoder2(args: Any) -> HFConfig:
    """StarCoder2 ``config.json`` fields for Megatron arguments."""
    rope = rope_to_hf(args)
    return {
        "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
        **fields_to_hf(args, STARCODER2_FIELDS), "sliding_window": megatron_window(args),
        "rope_parameters": rope, "rope_theta": rope["rope_theta"],
        "embedding_dropout": args.hidden_dropout,
    }


def starcoder2_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """StarCoder2 HF <-> Megatron rules (biases follow ``use_bias``)."""
    attention = "model.layers.*.self_attn."
    linear = WEIGHT_BIAS if config.add_bias_linear else WEIGHT
    rules: list[Rule] = [
        Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        *direct_rules("decoder.", "model.", {"final_layernorm": "norm"}, WEIGHT_BIAS),
        *direct_rules(LAYER, "model.layers.*.", {
            "input_layernorm": "input_layernorm",
            "pre_mlp_layernorm": "post_attention_layernorm"}, WEIGHT_BIAS),
        *direct_rules(LAYER, "model.layers.*.", {
            "self_attention.linear_proj": "self_attn.o_proj",
            "mlp.linear_fc1": "mlp.c_fc",
            "mlp.linear_fc2": "mlp.c_proj"}, linear),
        *[FusedQKV(f"{LAYER}self_attention.linear_qkv.{suffix}", f"{attention}q_proj.{suffix}",
                   f"{attention}k_proj.{suffix}", f"{attention}v_proj.{suffix}")
          for suffix in linear],
    ]
    return rules + output_layer_rules(tie_embeddings)


STARCODER = register_family(
    PatchedFamily(
        name="starcoder",
        hf_architectures=("GPTBigCodeForCausalLM",),
        hf_to_megatron=bigcode_to_megatron,
        megatron_to_hf=megatron_to_bigcode,
        weight_mappings=bigcode_mapping,
        sizes=STARCODER_SIZES,
    )
)

STARCODER2 = register_family(
    PatchedFamily(
        name="starcoder2",
        hf_architectures=("Starcoder2ForCausalLM",),
        hf_to_megatron=starcoder2_to_megatron,
        megatron_to_hf=megatron_to_starcoder2,
        weight_mappings=starcoder2_mapping,
        sizes=STARCODER2_SIZES,
    )
)
