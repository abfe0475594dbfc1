"""Falcon (``FalconForCausalLM``): 7B (MQA) and the "new decoder architecture" (40B/180B, GQA).

Attention and MLP run in parallel on one residual
(:class:`~megatron_patch.models.common.layers.ParallelAttentionMLPLayer`): Falcon-7B feeds both
from one ``input_layernorm``, the new decoder architecture has ``ln_attn`` and ``ln_mlp``
(``num_ln_in_parallel_attn``). ``parallel_attn: false`` is the usual sequential layer. Rotary
embeddings on the full head, LayerNorm with bias, erf GeLU, no linear biases unless ``bias``.
Falcon's fused ``query_key_value`` groups the query heads of each key/value head with it
(``[q.., k, v]`` per group), Megatron's own layout, so it maps directly. The ALiBi variant
(``alibi: true``, Falcon-RW) scales its bias with the scores and is not supported.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.mapping.rules import Direct, Rule
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
    HIDDEN_DROPOUT,
    HIDDEN_SIZE,
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
    rope_to_hf,
    rope_to_megatron,
)
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.falcon.sizes import FALCON_SIZES
from megatron_patch.models.registry import register_family

# Falcon's rows; the attention layout (heads, parallel layer, norms) and rope are read below.
FALCON_FIELDS = decoder_fields(
    Fixed("alibi", False, why="Falcon-RW's ALiBi is scaled with the attention scores"),
    Fixed("activation", "gelu"),
    Field("num_hidden_layers", "num_layers", int, also=("n_layer",)),
    HIDDEN_SIZE,
    Field("ffn_hidden_size", "ffn_hidden_size", int, default=gpt_ffn_hidden_size),
    Field("num_attention_heads", "num_attention_heads", int, also=("n_head",)),
    Field("max_position_embeddings", "max_position_embeddings", int, default=2048),
    Field("layer_norm_epsilon", "layernorm_epsilon", float, default=1e-5),
    Field("bias", "add_bias_linear", bool, default=False),
    TIED_EMBEDDINGS,
    VOCAB_SIZE,
    ATTENTION_DROPOUT,
    HIDDEN_DROPOUT,
    INITIALIZER_RANGE,
    Arg("mlp_activation", "gelu"),
)


def _kv_heads(hf: HFConfig) -> MegatronArgs:
    """``num_query_groups`` where Falcon has fewer key/value heads than query heads."""
    if hf.get("new_decoder_architecture"):
        groups = hf.get("num_kv_heads")
    else:
        groups = 1 if hf.get("multi_query", True) else None
    return {"num_query_groups": int(groups)} if groups else {}


def falcon_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a Falcon ``config.json``."""
    refuse(hf, "apply_residual_connection_post_layernorm", True, False,
           "the residual would be taken after the input norm")
    new = bool(hf.get("new_decoder_architecture"))
    if new:
        refuse(hf, "parallel_attn", False, True, "the new decoder architecture is parallel")
    return fields_to_megatron(
        hf, FALCON_FIELDS, **_kv_heads(hf),
        parallel_attention_mlp=bool(new or hf.get("parallel_attn", True)),
        parallel_attention_norms=int(hf.get("num_ln_in_parallel_attn") or 2) if new else 1,
        **rope_to_megatron(hf))


def megatron_to_falcon(args: Any) -> HFConfig:
    """Falcon ``config.json`` fields for Megatron arguments."""
    heads = args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else heads
    parallel = getattr(args, "parallel_attention_mlp", False)
    norms = getattr(args, "parallel_attention_norms", 1)
    new = parallel and (norms == 2 or groups not in (1, heads))
    rope = rope_to_hf(args)
    return {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon",
        **fields_to_hf(args, FALCON_FIELDS), "num_kv_heads": groups,
        "new_decoder_architecture": new, "multi_query": groups == 1, "parallel_attn": parallel,
        "num_ln_in_parallel_attn": norms if new else None,
        "rope_parameters": rope, "rope_theta": rope["rope_theta"],
    }


def falcon_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """Falcon HF <-> Megatron rules; the norms follow the layer kind."""
    if not config.parallel_attention_mlp:
        norms = {"input_layernorm": "input_layernorm",
                 "pre_mlp_layernorm": "post_attention_layernorm"}
    elif config.parallel_attention_norms == 2:
        norms = {"input_layernorm": "ln_attn", "pre_mlp_layernorm": "ln_mlp"}
    else:
        norms = {"input_layernorm": "input_layernorm"}
    linear = WEIGHT_BIAS if config.add_bias_linear else WEIGHT
    rules: list[Rule] = [
        Direct("embedding.word_embeddings.weight", "transformer.word_embeddings.weight"),
        *direct_rules("decoder.", "transformer.", {"final_layernorm": "ln_f"}, WEIGHT_BIAS),
        *direct_rules(LAYER, "transformer.h.*.", norms, WEIGHT_BIAS),
        *direct_rules(LAYER, "transformer.h.*.", {
            "self_attention.linear_qkv": "self_attention.query_key_value",
            "self_attention.linear_proj": "self_attention.dense",
            "mlp.linear_fc1": "mlp.dense_h_to_4h",
            "mlp.linear_fc2": "mlp.dense_4h_to_h"}, linear),
    ]
    return rules + output_layer_rules(tie_embeddings)


FALCON = register_family(
    PatchedFamily(
        name="falcon",
        hf_architectures=("FalconForCausalLM",),
        hf_to_megatron=falcon_to_megatron,
        megatron_to_hf=megatron_to_falcon,
        weight_mappings=falcon_mapping,
        sizes=FALCON_SIZES,
    )
)
