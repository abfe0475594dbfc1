"""DeepSeek-V3 (``DeepseekV3ForCausalLM``) and DeepSeek-V2 / V2-Lite (``DeepseekV2ForCausalLM``).

Multi-Latent Attention (:mod:`megatron_patch.models.common.mla`): q LoRA (``q_a_proj``,
``q_a_layernorm``, ``q_b_proj``; V2-Lite: one ``q_proj``), kv LoRA (``kv_a_proj_with_mqa`` with
the decoupled rope key, ``kv_a_layernorm``, ``kv_b_proj``), ``--qk-pos-emb-head-dim`` rope dims
with DeepSeek's interleaved rotation, YaRN scaling (``--rope-type yarn``,
``--rotary-scaling-factor``, ``--mscale``, ``--mscale-all-dim``; Megatron's MLA fixes
``beta_fast`` 32, ``beta_slow`` 1 and ``original_max_position_embeddings`` 4096, the released
values, and other values are refused). The first ``first_k_dense_replace`` layers are dense
(``--moe-layer-freq`` pattern, ``intermediate_size``); the others have
``n_shared_experts * moe_intermediate_size`` shared-expert units (no gate) and routed experts.

Routers, reproduced for inference with (see :mod:`megatron_patch.models.common.moe`):

- V3 (``noaux_tc``): ``--moe-router-score-function sigmoid``, ``--moe-router-enable-expert-bias``
  (``e_score_correction_bias`` selects experts but does not weight them), group-limited top-k
  ``--moe-router-num-groups n_group --moe-router-group-topk topk_group`` (a group scores the sum
  of its two best experts, which Megatron reproduces when ``num_experts_per_tok / topk_group``
  is 2, as in the released model), renormalised top-k weights times
  ``--moe-router-topk-scaling-factor routed_scaling_factor``.
- V2 (``greedy``; ``group_limited_greedy`` when ``num_experts_per_tok == topk_group``): softmax
  over all experts, ``--moe-router-pre-softmax`` (no renormalisation), the same scaling.

No capacity factor (no token dropping). For training: ``--moe-router-load-balancing-type
seq_aux_loss`` with ``aux_loss_alpha`` (``aux_loss`` if ``seq_aux`` is false) and, for V3,
Megatron's expert-bias update (``--moe-router-bias-update-rate``, default 1e-3).

Multi-token-prediction layers (``num_nextn_predict_layers``; the tensors of layers numbered
from ``num_hidden_layers`` on) are not converted: conversion warns and drops them, as HF
transformers does when loading.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.mapping.rules import Direct, Rule
from megatron_patch.models.common.hf_config import (
    LLAMA_STYLE_FIELDS,
    Arg,
    Field,
    Fixed,
    fields_to_hf,
    fields_to_megatron,
    llama_style_to_megatron,
    rope_parameters,
    without,
)
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.common.mla import mla_layer_spec
from megatron_patch.models.common.moe import (
    MoEFamily,
    Router,
    aux_loss_coeff,
    first_dense_layers,
    moe_layer_pattern,
    moe_mlp_rules,
    moe_to_megatron,
    routed_experts,
)
from megatron_patch.models.deepseek.sizes import DEEPSEEK_SIZES
from megatron_patch.models.registry import register_family

# YaRN settings Megatron-Core's MLA does not take from arguments (MLATransformerConfig defaults).
_MLA_YARN_FIXED = {"beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096}
# HF DeepSeek builds its q/kv latent RMSNorms with this epsilon whatever rms_norm_eps says.
_LATENT_NORM_EPS = 1e-6
_MTP_LAYER = "model.layers.{}."
# DeepSeek's own rows, after the llama-style ones: no attention bias, Multi-Latent Attention's
# sizes (they replace head_dim; Megatron's kv_channels is the value head size).
_OWN_FIELDS = (
    Fixed("attention_bias", False),
    Arg("multi_latent_attention", True),
    Field("q_lora_rank", "q_lora_rank", default=None),  # None: one q_proj (V2-Lite)
    Field("kv_lora_rank", "kv_lora_rank", int),
    Field("qk_nope_head_dim", "qk_head_dim", int),
    Field("qk_rope_head_dim", "qk_pos_emb_head_dim", int),
    Field("v_head_dim", "v_head_dim", int),
    Arg("kv_channels", lambda args: args["v_head_dim"]),
)


def _rope_to_megatron(hf: HFConfig) -> MegatronArgs:
    rope = rope_parameters(hf)
    theta = float(rope["rope_theta"])
    args: MegatronArgs = {"rotary_base": int(theta) if theta.is_integer() else theta,
                          "rope_type": "rope"}
    if rope["rope_type"] == "default":
        return args
    if rope["rope_type"] != "yarn":
        raise UnsupportedConfigError(f"config.json: rope type {rope['rope_type']!r} is not "
                                     "supported for DeepSeek (default, yarn)")
    for key, fixed in _MLA_YARN_FIXED.items():
        if rope.get(key) is not None and float(rope[key]) != fixed:
            raise UnsupportedConfigError(f"config.json: yarn {key}={rope[key]} is not supported "
                                         f"(Megatron-Core's MLA uses {key}={fixed:g})")
    if not rope.get("truncate", True) or rope.get("attention_factor") is not None:
        raise UnsupportedConfigError("config.json: yarn truncate=false / attention_factor are "
                                     "not supported")
    factor = float(rope.get("factor") or int(hf["max_position_embeddings"]) / 4096)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        raise UnsupportedConfigError("config.json: yarn mscale_all_dim without mscale is not "
                                     "supported")
    if not mscale_all_dim:  # HF ignores mscale then: cos/sin scaled by get_mscale(factor)
        mscale, mscale_all_dim = 1.0, 0.0
    return {**args, "rope_type": "yarn", "rotary_scaling_factor": factor,
            "mscale": float(mscale), "mscale_all_dim": float(mscale_all_dim)}


def _router(hf: HFConfig, v3: bool) -> Router:
    experts = routed_experts(hf, "n_routed_experts")
    topk = int(hf.get("num_experts_per_tok") or 1)
    scaling = float(hf.get("routed_scaling_factor") or 1.0)
    groups, group_topk = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if v3:
        for field, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if hf.get(field, expected) != expected:
                raise UnsupportedConfigError(f"config.json: {field}={hf[field]!r} is not "
                                             f"supported for DeepSeek-V3 ({expected})")
        return Router(experts, topk, score="sigmoid", normalize=bool(hf.get("norm_topk_prob")),
                      scaling=scaling, groups=groups, group_topk=group_topk, expert_bias=True)
    method = hf.get("topk_method", "greedy")
    if hf.get("scoring_func", "softmax") != "softmax":
        raise UnsupportedConfigError(f"config.json: scoring_func={hf['scoring_func']!r} is not "
                                     "supported for DeepSeek-V2 (softmax)")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedConfigError(f"config.json: topk_method={method!r} is not supported "
                                     "for DeepSeek-V2 (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    # HF V2 scores a group by its best expert: Megatron's top-(k/topk_group) sum when that is 1.
    return Router(experts, topk, normalize=False, scaling=scaling,
                  groups=groups if grouped else None, group_topk=group_topk if grouped else None,
                  group_score_top=1)


def _to_megatron(hf: HFConfig) -> MegatronArgs:
    v3 = "DeepseekV3ForCausalLM" in (hf.get("architectures") or [])
    if float(hf.get("rms_norm_eps", _LATENT_NORM_EPS)) != _LATENT_NORM_EPS:
        raise UnsupportedConfigError(f"config.json: rms_norm_eps={hf['rms_norm_eps']} is not "
                                     f"supported (HF DeepSeek's latent norms use "
                                     f"{_LATENT_NORM_EPS:g}, Megatron one epsilon for all)")
    if v3 and not hf.get("rope_interleave", True):
        raise UnsupportedConfigError("config.json: rope_interleave=false is not supported "
                                     "(Megatron-Core's MLA rotates interleaved rope dims)")
    if int(hf.get("moe_layer_freq") or 1) != 1:
        raise UnsupportedConfigError(f"config.json: moe_layer_freq={hf['moe_layer_freq']} is not "
                                     "supported (1: every layer after the dense ones)")
    heads = int(hf["num_attention_heads"])
    if int(hf.get("num_key_value_heads") or heads) != heads:
        raise UnsupportedConfigError("config.json: num_key_value_heads must equal "
                                     "num_attention_heads for Multi-Latent Attention")
    plain = {**hf, "rope_parameters": None, "rope_scaling": None, "num_key_value_heads": heads,
             "head_dim": None}  # attention fields are MLA's, set below
    layers = int(hf["num_hidden_layers"])
    dense = int(hf.get("first_k_dense_replace") or 0)
    shared = int(hf.get("n_shared_experts") or 0) * int(hf["moe_intermediate_size"])
    return {
        **llama_style_to_megatron(plain, qk_layernorm=True),
        **fields_to_megatron(hf, _OWN_FIELDS),
        **_rope_to_megatron(hf),
        **moe_to_megatron(
            _router(hf, v3), ffn_hidden_size=int(hf["moe_intermediate_size"]),
            moe_layers=[int(i >= dense) for i in range(layers)],
            shared_ffn_hidden_size=shared or None,
            aux_loss_type="seq_aux_loss" if hf.get("seq_aux", True) else "aux_loss",
            aux_loss_coeff=float(hf.get("aux_loss_alpha", 0.001))),
    }


def _rope_to_hf(args: Any) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
    if args.rope_type == "yarn":
        rope.update(rope_type="yarn", factor=args.rotary_scaling_factor, mscale=args.mscale,
                    mscale_all_dim=args.mscale_all_dim, **_MLA_YARN_FIXED)
    return rope


def _to_hf(args: Any) -> HFConfig:
    v3 = args.moe_router_score_function == "sigmoid"
    grouped = args.moe_router_num_groups is not None
    config = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        **fields_to_hf(args, (*without(LLAMA_STYLE_FIELDS, "head_dim"), *_OWN_FIELDS)),
        "moe_intermediate_size": args.moe_ffn_hidden_size,
        "n_shared_experts": (args.moe_shared_expert_intermediate_size or 0)
        // args.moe_ffn_hidden_size,
        "n_routed_experts": args.num_experts,
        "num_experts_per_tok": args.moe_router_topk,
        "routed_scaling_factor": args.moe_router_topk_scaling_factor or 1.0,
        "n_group": args.moe_router_num_groups or 1,
        "topk_group": args.moe_router_group_topk or 1,
        "norm_topk_prob": v3 and args.moe_router_topk > 1,
        "first_k_dense_replace": first_dense_layers(moe_layer_pattern(args),
                                                    "first_k_dense_replace"),
        "rope_parameters": _rope_to_hf(args),
        "aux_loss_alpha": aux_loss_coeff(args),
        "seq_aux": args.moe_router_load_balancing_type in ("seq_aux_loss", ["seq_aux_loss"]),
    }
    if v3:
        return {**config, "rope_interleave": True, "topk_method": "noaux_tc",
                "scoring_func": "sigmoid"}
    return {**config, "topk_method": "group_limited_greedy" if grouped else "greedy"}


def _mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """Embeddings, norms and dense MLPs as llama-style; MLA; the MoE layers."""
    attn, h = "decoder.layers.*.self_attention.", "model.layers.*.self_attn."
    mla = [Direct(attn + "linear_kv_down_proj.weight", h + "kv_a_proj_with_mqa.weight"),
           Direct(attn + "kv_layernorm.weight", h + "kv_a_layernorm.weight"),
           Direct(attn + "linear_kv_up_proj.weight", h + "kv_b_proj.weight"),
           Direct(attn + "linear_proj.weight", h + "o_proj.weight")]
    if config.q_lora_rank is None:
        mla.append(Direct(attn + "linear_q_proj.weight", h + "q_proj.weight"))
    else:
        mla += [Direct(attn + "linear_q_down_proj.weight", h + "q_a_proj.weight"),
                Direct(attn + "q_layernorm.weight", h + "q_a_layernorm.weight"),
                Direct(attn + "linear_q_up_proj.weight", h + "q_b_proj.weight")]
    dense = [rule for rule in llama_style_mapping(config, tie_embeddings)
             if ".self_attention." not in rule.megatron]
    return dense + mla + moe_mlp_rules(
        "model.layers.*.mlp.", router="gate", experts="experts", gate="gate_proj",
        up="up_proj", down="down_proj",
        shared="shared_experts" if config.moe_shared_expert_intermediate_size else None,
        expert_bias="gate.e_score_correction_bias" if config.moe_router_enable_expert_bias
        else None)


def _multi_token_prediction(hf: HFConfig, names: list[str]) -> tuple[list[str], str]:
    layers = int(hf["num_hidden_layers"])
    extra = range(layers, layers + int(hf.get("num_nextn_predict_layers") or 0))
    prefixes = tuple(_MTP_LAYER.format(i) for i in extra)
    dropped = [name for name in names if prefixes and name.startswith(prefixes)]
    return dropped, ("multi-token-prediction layers (num_nextn_predict_layers) are dropped; "
                     "the converted model predicts the next token only")


class DeepSeekFamily(MoEFamily):
    """DeepSeek: dense and MoE layers, all with Multi-Latent Attention."""

    def layer_spec(self, config: TransformerConfig, transformer_engine: bool | None = None,
                   moe: bool | None = None) -> ModuleSpec:
        """MLA decoder layer, dense or MoE."""
        return mla_layer_spec(config, transformer_engine, moe)


DEEPSEEK = register_family(
    DeepSeekFamily(
        name="deepseek",
        hf_architectures=("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"),
        hf_to_megatron=_to_megatron,
        megatron_to_hf=_to_hf,
        weight_mappings=_mapping,
        qk_layernorm=True,
        unconverted_hf_tensors=_multi_token_prediction,
        sizes=DEEPSEEK_SIZES,
    )
)
