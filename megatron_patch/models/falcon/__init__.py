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
    decoder_args,
    direct_rules,
    field,
    output_layer_rules,
    refuse,
)
from megatron_patch.models.common.hf_config import _expect, rope_to_hf, rope_to_megatron
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.falcon.sizes import FALCON_SIZES
from megatron_patch.models.registry import register_family


def _kv_heads(hf: HFConfig, heads: int) -> int:
    if hf.get("new_decoder_architecture"):
        return int(hf.get("num_kv_heads") or heads)
    return 1 if hf.get("multi_query", True) else heads


def falcon_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a Falcon ``config.json``."""
    refuse(hf, "alibi", True, False, "Falcon-RW's ALiBi is scaled with the attention scores")
    refuse(hf, "apply_residual_connection_post_layernorm", True, False,
           "the residual would be taken after the input norm")
    _expect(hf, "activation", ("gelu",), "gelu")
    new = bool(hf.get("new_decoder_architecture"))
    if new:
        refuse(hf, "parallel_attn", False, True, "the new decoder architecture is parallel")
    parallel = new or hf.get("parallel_attn", True)
    hidden = field(hf, "hidden_size")
    heads = field(hf, "num_attention_heads", "n_head")
    norms = int(hf.get("num_ln_in_parallel_attn") or 2) if new else 1
    return decoder_args(
        layers=field(hf, "num_hidden_layers", "n_layer"), hidden=hidden,
        ffn=field(hf, "ffn_hidden_size", default=4 * hidden), heads=heads,
        kv_heads=_kv_heads(hf, heads), vocab=field(hf, "vocab_size"),
        max_positions=field(hf, "max_position_embeddings", default=2048), norm="LayerNorm",
        eps=field(hf, "layer_norm_epsilon", default=1e-5),
        tied=hf.get("tie_word_embeddings", True), bias=bool(hf.get("bias", False)),
        attention_dropout=field(hf, "attention_dropout", default=0.0),
        hidden_dropout=field(hf, "hidden_dropout", default=0.0),
        init_std=field(hf, "initializer_range", default=0.02),
        mlp_activation="gelu", parallel_attention_mlp=bool(parallel),
        parallel_attention_norms=norms, **rope_to_megatron(hf),
    )


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
        "hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers,
        "num_attention_heads": heads, "num_kv_heads": groups,
        "new_decoder_architecture": new, "multi_query": groups == 1, "parallel_attn": parallel,
        "num_ln_in_parallel_attn": norms if new else None, "alibi": False,
        "bias": args.add_bias_linear, "ffn_hidden_size": args.ffn_hidden_size,
        "activation": "gelu", "layer_norm_epsilon": args.layernorm_epsilon,
        "max_position_embeddings": args.max_position_embeddings,
        "rope_parameters": rope, "rope_theta": rope["rope_theta"],
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "vocab_size": args.vocab_size, "attention_dropout": args.attention_dropout,
        "hidden_dropout": args.hidden_dropout, "initializer_range": args.init_method_std,
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
