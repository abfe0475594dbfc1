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

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.mapping.rules import Direct, FusedQKV, Rule
from megatron_patch.models.common.decoder_args import (
    LAYER,
    WEIGHT,
    WEIGHT_BIAS,
    decoder_args,
    direct_rules,
    field,
    output_layer_rules,
    refuse,
)
from megatron_patch.models.common.hf_config import (
    megatron_window,
    mistral_window,
    rope_to_hf,
    rope_to_megatron,
)
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.registry import register_family
from megatron_patch.models.starcoder.sizes import STARCODER2_SIZES, STARCODER_SIZES

# HF activation names -> --mlp-activation.
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}
_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


def _activation(hf: HFConfig, name: str, default: str) -> str:
    value = hf.get(name) or default
    if value not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"config.json: {name}={value!r} is not supported "
                                     f"(expected one of {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[value]


def bigcode_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a GPTBigCode ``config.json``."""
    refuse(hf, "scale_attn_weights", False, True, "attention scores are always scaled")
    refuse(hf, "add_cross_attention", True, False, "decoder-only models only")
    activation = _activation(hf, "activation_function", "gelu_pytorch_tanh")
    hidden = field(hf, "n_embd", "hidden_size")
    heads = field(hf, "n_head", "num_attention_heads")
    return decoder_args(
        layers=field(hf, "n_layer", "num_hidden_layers"), hidden=hidden,
        ffn=field(hf, "n_inner", default=4 * hidden), heads=heads,
        kv_heads=1 if hf.get("multi_query", True) else heads, vocab=field(hf, "vocab_size"),
        max_positions=field(hf, "n_positions", "max_position_embeddings", default=1024),
        norm="LayerNorm", eps=field(hf, "layer_norm_epsilon", default=1e-5),
        tied=hf.get("tie_word_embeddings", True), bias=True,
        attention_dropout=field(hf, "attn_pdrop", default=0.0),
        hidden_dropout=field(hf, "resid_pdrop", default=0.0),
        init_std=field(hf, "initializer_range", default=0.02),
        position_embedding_type="learned_absolute", mlp_activation=activation,
    )


def megatron_to_bigcode(args: Any) -> HFConfig:
    """GPTBigCode ``config.json`` fields for Megatron arguments."""
    dropout = {"attn_pdrop": args.attention_dropout, "resid_pdrop": args.hidden_dropout,
               "embd_pdrop": args.hidden_dropout}
    return {
        "architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode",
        "n_embd": args.hidden_size, "n_layer": args.num_layers,
        "n_head": args.num_attention_heads, "n_inner": args.ffn_hidden_size,
        "n_positions": args.max_position_embeddings,
        "multi_query": args.group_query_attention and args.num_query_groups == 1,
        "activation_function": _HF_ACTIVATION[args.mlp_activation],
        "layer_norm_epsilon": args.layernorm_epsilon,
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "vocab_size": args.vocab_size, "initializer_range": args.init_method_std,
        "scale_attn_weights": True, **dropout,
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


def starcoder2_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a StarCoder2 ``config.json``."""
    hidden = field(hf, "hidden_size")
    heads = field(hf, "num_attention_heads")
    window = mistral_window(hf)
    return decoder_args(
        layers=field(hf, "num_hidden_layers"), hidden=hidden,
        ffn=field(hf, "intermediate_size"), heads=heads,
        kv_heads=field(hf, "num_key_value_heads", default=heads), vocab=field(hf, "vocab_size"),
        max_positions=field(hf, "max_position_embeddings", default=4096), norm="LayerNorm",
        eps=field(hf, "norm_epsilon", default=1e-5),
        tied=hf.get("tie_word_embeddings", True), bias=hf.get("use_bias", True),
        attention_dropout=field(hf, "attention_dropout", default=0.0),
        hidden_dropout=field(hf, "residual_dropout", default=0.0),
        init_std=field(hf, "initializer_range", default=0.02),
        mlp_activation=_activation(hf, "hidden_act", "gelu_pytorch_tanh"),
        window_size=None if window is None else (window - 1, 0), **rope_to_megatron(hf),
    )


def megatron_to_starcoder2(args: Any) -> HFConfig:
    """StarCoder2 ``config.json`` fields for Megatron arguments."""
    heads = args.num_attention_heads
    rope = rope_to_hf(args)
    return {
        "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
        "hidden_size": args.hidden_size, "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": heads,
        "num_key_value_heads": args.num_query_groups if args.group_query_attention else heads,
        "hidden_act": _HF_ACTIVATION[args.mlp_activation],
        "max_position_embeddings": args.max_position_embeddings,
        "norm_epsilon": args.layernorm_epsilon, "use_bias": args.add_bias_linear,
        "sliding_window": megatron_window(args), "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "vocab_size": args.vocab_size, "attention_dropout": args.attention_dropout,
        "residual_dropout": args.hidden_dropout, "embedding_dropout": args.hidden_dropout,
        "initializer_range": args.init_method_std,
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
