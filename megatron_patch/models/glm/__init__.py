"""GLM-4 (``GlmForCausalLM``), GLM-4-0414 (``Glm4ForCausalLM``) and ChatGLM2/3 / glm-4-9b.

GLM is llama-shaped with GQA, a bias on q/k/v only, a fused ``gate_up_proj`` (Megatron's own
``[gate; up]`` layout) and rotary embeddings on the first half of each head with GLM's pairwise
interleaving (Megatron's ``rotary_percent`` 0.5 and ``rotary_interleaved``). ``Glm4`` adds a
norm on the attention and on the MLP output before each residual add (``post_sublayer_norms``).

ChatGLM2/3 and THUDM's original glm-4-9b (``ChatGLMModel``, remote code, not in transformers)
compute exactly what ``GlmForCausalLM`` computes; the ``chatglm`` family reads their own config
and tensor names (``transformer.encoder.layers.N.self_attention.query_key_value``: ``[q; k; v]``
stacked) into the same Megatron model. Their ``rope_ratio`` scales the rotary base.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.mapping.rules import Direct, Rule, StackedQKV
from megatron_patch.models.common.decoder_args import LAYER, direct_rules, replace_rules
from megatron_patch.models.common.hf_config import (
    ATTENTION_DROPOUT,
    ATTENTION_HEADS,
    HIDDEN_DROPOUT,
    HIDDEN_SIZE,
    Arg,
    Field,
    Fixed,
    decoder_fields,
    fields_to_hf,
    fields_to_megatron,
    hidden_per_head,
    key_value_heads,
    llama_style_to_megatron,
    megatron_to_llama_style,
    require,
    rope_parameters,
)
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.glm.sizes import CHATGLM_SIZES, GLM_SIZES
from megatron_patch.models.registry import register_family

_FC1 = LAYER + "mlp.linear_fc1.weight"


def glm_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a ``GlmForCausalLM`` / ``Glm4ForCausalLM`` ``config.json``."""
    rope = rope_parameters(hf)
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))
    # GLM's attention_bias is a bias on q/k/v only (o_proj never has one).
    args = llama_style_to_megatron({**hf, "attention_bias": False},
                                   qkv_bias=bool(hf.get("attention_bias", True)))
    glm4 = "Glm4ForCausalLM" in (hf.get("architectures") or [])
    return {**args, "rotary_percent": partial, "rotary_interleaved": True,
            "post_sublayer_norms": glm4}


def _to_glm(args: Any, architecture: str, model_type: str) -> HFConfig:
    # pad_token_id: the class default (151329) is a token of GLM's own vocabulary only.
    config = megatron_to_llama_style(args, architecture, model_type,
                                     attention_bias=args.add_qkv_bias, pad_token_id=None)
    config.pop("partial_rotary_factor", None)
    config["rope_parameters"] = {**config["rope_parameters"],
                                 "partial_rotary_factor": args.rotary_percent}
    return config


def megatron_to_glm(args: Any) -> HFConfig:
    """``GlmForCausalLM`` or ``Glm4ForCausalLM`` ``config.json`` fields for Megatron arguments."""
    if getattr(args, "post_sublayer_norms", False):
        return _to_glm(args, "Glm4ForCausalLM", "glm4")
    return _to_glm(args, "GlmForCausalLM", "glm")


def glm_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """GLM HF <-> Megatron rules: llama's, with the fused ``gate_up_proj``."""
    rules = replace_rules(llama_style_mapping(config, tie_embeddings),
                          Direct(_FC1, "model.layers.*.mlp.gate_up_proj.weight"))
    if config.post_sublayer_norms:
        rules += direct_rules(LAYER, "model.layers.*.", {
            "self_attention.post_layernorm": "post_self_attn_layernorm",
            "mlp.post_layernorm": "post_mlp_layernorm"})
    return rules


# ChatGLM2/3's rows; multi-query attention and the rotary base are read below.
CHATGLM_FIELDS = decoder_fields(
    Fixed("apply_residual_connection_post_layernorm", False, why="residual after the norm"),
    Fixed("post_layer_norm", True, why="the model has no final norm"),
    Fixed("rmsnorm", True, why="ChatGLM-6B (v1) LayerNorm models"),
    Fixed("add_bias_linear", False, why="biases beyond q/k/v"),
    Field("num_layers", "num_layers", int),
    HIDDEN_SIZE,
    Field("ffn_hidden_size", "ffn_hidden_size", int),
    ATTENTION_HEADS,
    Field("kv_channels", "kv_channels", int, default=hidden_per_head),
    Field("seq_length", "max_position_embeddings", int, default=8192),
    Arg("normalization", "RMSNorm"),
    Field("layernorm_epsilon", "layernorm_epsilon", float, default=1e-5),
    Arg("swiglu", True),
    Arg("add_bias_linear", False),
    Field("add_qkv_bias", "add_qkv_bias", bool, default=True),
    Arg("untie_embeddings_and_output_weights", True),
    Field("padded_vocab_size", "vocab_size", int),
    ATTENTION_DROPOUT,
    HIDDEN_DROPOUT,
    Arg("init_method_std", 0.02),
    Arg("position_embedding_type", "rope"),
    Arg("rotary_percent", 0.5),
    Arg("rotary_interleaved", True),
)


def chatglm_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a ChatGLM2/3 (``ChatGLMModel``) ``config.json``."""
    if hf.get("pre_seq_len") is not None:
        raise UnsupportedConfigError("config.json: pre_seq_len is set (a P-tuning prefix "
                                     "encoder); convert the base model")
    mqa = hf.get("multi_query_attention")
    groups = {"num_query_groups": int(require(hf, "multi_query_group_num"))} if mqa else {}
    base = 10000 * float(hf.get("rope_ratio", 1))
    args = fields_to_megatron(hf, CHATGLM_FIELDS, **groups,
                              rotary_base=int(base) if base.is_integer() else base)
    if mqa and args["num_query_groups"] == args["num_attention_heads"]:
        raise UnsupportedConfigError("config.json: multi_query_attention with "
                                     "multi_query_group_num == num_attention_heads")
    return args


def megatron_to_chatglm(args: Any) -> HFConfig:
    """ChatGLM2/3 ``config.json`` fields for Megatron arguments."""
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        **fields_to_hf(args, CHATGLM_FIELDS), "multi_query_attention": args.group_query_attention,
        "multi_query_group_num": key_value_heads(args), "rope_ratio": args.rotary_base / 10000,
        "tie_word_embeddings": False,
    }


def chatglm_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """ChatGLM2/3 HF <-> Megatron rules."""
    hf = "transformer.encoder.layers.*."
    qkv = "self_attention.query_key_value."
    stacked = config.num_query_groups != config.num_attention_heads
    suffixes = ("weight", "bias") if config.add_qkv_bias else ("weight",)
    return [
        Direct("embedding.word_embeddings.weight", "transformer.embedding.word_embeddings.weight"),
        Direct("decoder.final_layernorm.weight", "transformer.encoder.final_layernorm.weight"),
        Direct("output_layer.weight", "transformer.output_layer.weight"),
        *[(StackedQKV if stacked else Direct)(f"{LAYER}self_attention.linear_qkv.{suffix}",
                                              f"{hf}{qkv}{suffix}") for suffix in suffixes],
        *direct_rules(LAYER, hf, {
            "input_layernorm": "input_layernorm",
            "self_attention.linear_proj": "self_attention.dense",
            "pre_mlp_layernorm": "post_attention_layernorm",
            "mlp.linear_fc1": "mlp.dense_h_to_4h",
            "mlp.linear_fc2": "mlp.dense_4h_to_h"}),
    ]


GLM = register_family(
    PatchedFamily(
        name="glm",
        hf_architectures=("GlmForCausalLM", "Glm4ForCausalLM"),
        hf_to_megatron=glm_to_megatron,
        megatron_to_hf=megatron_to_glm,
        weight_mappings=glm_mapping,
        sizes=GLM_SIZES,
    )
)

CHATGLM = register_family(
    PatchedFamily(
        name="chatglm",
        hf_architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
        hf_to_megatron=chatglm_to_megatron,
        megatron_to_hf=megatron_to_chatglm,
        weight_mappings=chatglm_mapping,
        sizes=CHATGLM_SIZES,
    )
)
