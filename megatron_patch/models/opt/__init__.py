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
    direct_rules,
    output_layer_rules,
    refuse,
)
from megatron_patch.models.common.hf_config import (
    ATTENTION_DROPOUT,
    ATTENTION_HEADS,
    HIDDEN_SIZE,
    NUM_LAYERS,
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    Arg,
    Field,
    Fixed,
    decoder_fields,
    fields_to_hf,
    fields_to_megatron,
)
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.opt.sizes import OPT_SIZES
from megatron_patch.models.registry import register_family

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
_HF = "model.decoder."
OPT_FIELDS = decoder_fields(
    Fixed("do_layer_norm_before", True, why="post-LN layers (OPT-350m)"),
    Fixed("layer_norm_elementwise_affine", True, why="norms without weights"),
    NUM_LAYERS,
    HIDDEN_SIZE,
    Field("ffn_dim", "ffn_hidden_size", int),
    ATTENTION_HEADS,
    Field("max_position_embeddings", "max_position_embeddings", int, default=2048),
    Field("activation_function", "mlp_activation", default="relu", values=("relu", "gelu")),
    Arg("layernorm_epsilon", 1e-5),
    Field("enable_bias", "add_bias_linear", bool, default=True),
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    ATTENTION_DROPOUT,
    Field("dropout", "hidden_dropout", float, default=0.0),
    Field("init_std", "init_method_std", float, default=0.02),
    Arg("position_embedding_type", "learned_absolute"),
    Arg("position_id_offset", POSITION_OFFSET),
)


def opt_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for an OPT / Galactica ``config.json``."""
    refuse(hf, "_remove_final_layer_norm", True, False, "no final norm")
    if hf.get("word_embed_proj_dim") not in (None, hf.get("hidden_size")):
        raise UnsupportedConfigError(f"config.json: word_embed_proj_dim="
                                     f"{hf['word_embed_proj_dim']} != hidden_size="
                                     f"{hf.get('hidden_size')} (projected embeddings, OPT-350m) "
                                     "is not supported")
    return fields_to_megatron(hf, OPT_FIELDS)


def megatron_to_opt(args: Any) -> HFConfig:
    """OPT ``config.json`` fields for Megatron arguments."""
    return {"architectures": ["OPTForCausalLM"], "model_type": "opt",
            **fields_to_hf(args, OPT_FIELDS), "word_embed_proj_dim": args.hidden_size}


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
