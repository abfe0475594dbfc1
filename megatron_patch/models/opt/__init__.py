"""OPT and Galactica (``OPTForCausalLM``).

Pre-LN GPT decoders with learned absolute positions looked up at ``position + 2`` (OPT's
offset: its table has ``max_position_embeddings + 2`` rows, kept whole), LayerNorm with bias,
ReLU (OPT) or GeLU (Galactica) and biases on every linear layer unless ``enable_bias: false``.
OPT-350m's post-LN layers and projected embeddings (``word_embed_proj_dim``) are not supported.
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
from megatron_patch.models.common.hf_config import _expect
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.opt.sizes import OPT_SIZES
from megatron_patch.models.registry import register_family

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
_HF = "model.decoder."


def opt_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for an OPT / Galactica ``config.json``."""
    refuse(hf, "do_layer_norm_before", False, True, "post-LN layers (OPT-350m)")
    refuse(hf, "_remove_final_layer_norm", True, False, "no final norm")
    refuse(hf, "layer_norm_elementwise_affine", False, True, "norms without weights")
    hidden = field(hf, "hidden_size")
    if hf.get("word_embed_proj_dim") not in (None, hidden):
        raise UnsupportedConfigError(f"config.json: word_embed_proj_dim="
                                     f"{hf['word_embed_proj_dim']} != hidden_size={hidden} "
                                     "(projected embeddings, OPT-350m) is not supported")
    heads = field(hf, "num_attention_heads")
    activation = _expect(hf, "activation_function", ("relu", "gelu"), "relu")
    return decoder_args(
        layers=field(hf, "num_hidden_layers"), hidden=hidden, ffn=field(hf, "ffn_dim"),
        heads=heads, kv_heads=heads, vocab=field(hf, "vocab_size"),
        max_positions=field(hf, "max_position_embeddings", default=2048), norm="LayerNorm",
        eps=1e-5, tied=hf.get("tie_word_embeddings", True), bias=hf.get("enable_bias", True),
        attention_dropout=field(hf, "attention_dropout", default=0.0),
        hidden_dropout=field(hf, "dropout", default=0.0),
        init_std=field(hf, "init_std", default=0.02),
        position_embedding_type="learned_absolute", position_id_offset=POSITION_OFFSET,
        mlp_activation=activation,
    )


def megatron_to_opt(args: Any) -> HFConfig:
    """OPT ``config.json`` fields for Megatron arguments."""
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt",
        "hidden_size": args.hidden_size, "word_embed_proj_dim": args.hidden_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_attention_heads,
        "ffn_dim": args.ffn_hidden_size, "max_position_embeddings": args.max_position_embeddings,
        "activation_function": args.mlp_activation, "enable_bias": args.add_bias_linear,
        "do_layer_norm_before": True, "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "vocab_size": args.vocab_size, "dropout": args.hidden_dropout,
        "attention_dropout": args.attention_dropout, "init_std": args.init_method_std,
    }


def opt_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """OPT HF <-> Megatron rules."""
    layer = _HF + "layers.*."
    linear = WEIGHT_BIAS if config.add_bias_linear else WEIGHT
    rules: list[Rule] = [
        Direct("embedding.word_embeddings.weight", _HF + "embed_tokens.weight"),
        Direct("embedding.position_embeddings.weight", _HF + "embed_positions.weight"),
        *direct_rules("decoder.", _HF, {"final_layernorm": "final_layer_norm"}, WEIGHT_BIAS),
        *direct_rules(LAYER, layer, {"input_layernorm": "self_attn_layer_norm",
                                     "pre_mlp_layernorm": "final_layer_norm"}, WEIGHT_BIAS),
        *direct_rules(LAYER, layer, {"self_attention.linear_proj": "self_attn.out_proj",
                                     "mlp.linear_fc1": "fc1", "mlp.linear_fc2": "fc2"}, linear),
        *[FusedQKV(f"{LAYER}self_attention.linear_qkv.{suffix}",
                   *(f"{layer}self_attn.{p}_proj.{suffix}" for p in "qkv")) for suffix in linear],
    ]
    return rules + output_layer_rules(tie_embeddings)


OPT = register_family(
    PatchedFamily(
        name="opt",
        hf_architectures=("OPTForCausalLM",),
        hf_to_megatron=opt_to_megatron,
        megatron_to_hf=megatron_to_opt,
        weight_mappings=opt_mapping,
        sizes=OPT_SIZES,
    )
)
