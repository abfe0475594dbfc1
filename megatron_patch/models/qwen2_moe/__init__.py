"""Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``): Qwen2 attention (q/k/v bias), routed
experts plus one shared expert whose output is scaled by ``sigmoid(shared_expert_gate(x))``.

Megatron-Core options that reproduce HF inference (see :mod:`megatron_patch.models.common.moe`):
softmax router, ``--moe-router-pre-softmax`` unless ``norm_topk_prob`` (then the top-k weights
are renormalised, which a softmax over the top-k logits does); shared expert
``--moe-shared-expert-intermediate-size`` with ``--moe-shared-expert-gate``; no capacity factor
(no token dropping). Layers listed in ``mlp_only_layers`` or skipped by ``decoder_sparse_step``
are dense (``--moe-layer-freq`` pattern, ``intermediate_size``). ``router_aux_loss_coef``
becomes ``--moe-aux-loss-coeff`` for training.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.mapping.rules import Rule
from megatron_patch.models.common.hf_config import (
    llama_style_to_megatron,
    megatron_to_llama_style,
    qwen_window,
    qwen_window_fields,
)
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.common.moe import (
    MoEFamily,
    Router,
    aux_loss_coeff,
    moe_layer_pattern,
    moe_mlp_rules,
    moe_to_megatron,
    routed_experts,
)
from megatron_patch.models.qwen2_moe.sizes import QWEN2_MOE_SIZES
from megatron_patch.models.registry import register_family


def qwen_moe_layers(hf: HFConfig) -> list[int]:
    """HF Qwen-MoE: layer i has experts unless in ``mlp_only_layers``, every
    ``decoder_sparse_step``-th layer (1-based)."""
    step = int(hf.get("decoder_sparse_step") or 1)
    dense = set(hf.get("mlp_only_layers") or [])
    return [int(i not in dense and (i + 1) % step == 0)
            for i in range(int(hf["num_hidden_layers"]))]


def qwen_moe_to_megatron(hf: HFConfig, *, shared: bool, **llama_style: Any) -> MegatronArgs:
    """Qwen2-MoE / Qwen3-MoE config -> Megatron arguments (``shared``: a gated shared expert)."""
    router = Router(experts=routed_experts(hf, "num_experts", "num_local_experts"),
                    topk=int(hf.get("num_experts_per_tok") or 1),
                    normalize=bool(hf.get("norm_topk_prob", False)))
    return {
        **llama_style_to_megatron(hf, window=qwen_window, **llama_style),
        **moe_to_megatron(
            router, ffn_hidden_size=int(hf.get("moe_intermediate_size") or 0),
            moe_layers=qwen_moe_layers(hf),
            shared_ffn_hidden_size=hf.get("shared_expert_intermediate_size") if shared else None,
            shared_gate=True, aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0)),
    }


def qwen_moe_fields(args: Any) -> HFConfig:
    """HF Qwen-MoE config fields of Megatron MoE arguments (inverse of the above)."""
    pattern = moe_layer_pattern(args)
    return {
        "num_experts": args.num_experts,
        "num_experts_per_tok": args.moe_router_topk,
        "moe_intermediate_size": args.moe_ffn_hidden_size,
        "norm_topk_prob": not args.moe_router_pre_softmax,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
        "router_aux_loss_coef": aux_loss_coeff(args),
        "output_router_logits": False,
        **qwen_window_fields(args),
    }


def qwen_moe_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """Llama-style attention and dense layers, plus the Qwen-MoE expert layers."""
    shared = bool(config.moe_shared_expert_intermediate_size)
    return llama_style_mapping(config, tie_embeddings) + moe_mlp_rules(
        "model.layers.*.mlp.", router="gate", experts="experts", gate="gate_proj",
        up="up_proj", down="down_proj", shared="shared_expert" if shared else None,
        shared_gate="shared_expert_gate" if shared else None)


def _to_megatron(hf: HFConfig) -> MegatronArgs:
    return qwen_moe_to_megatron(hf, shared=True, qkv_bias=bool(hf.get("qkv_bias", True)))


def _to_hf(args: Any) -> HFConfig:
    return megatron_to_llama_style(
        args, "Qwen2MoeForCausalLM", "qwen2_moe", qkv_bias=args.add_qkv_bias,
        shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        **qwen_moe_fields(args))


QWEN2_MOE = register_family(
    MoEFamily(
        name="qwen2_moe",
        hf_architectures=("Qwen2MoeForCausalLM",),
        hf_to_megatron=_to_megatron,
        megatron_to_hf=_to_hf,
        weight_mappings=qwen_moe_mapping,
        sizes=QWEN2_MOE_SIZES,
    )
)
