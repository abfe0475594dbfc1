"""Mixtral (``MixtralForCausalLM``): Mistral attention, every layer a sparse MoE of
``num_local_experts`` SwiGLU experts (``w1`` gate, ``w3`` up, ``w2`` down), top-2 routing.

Megatron-Core options that reproduce HF inference (see :mod:`megatron_patch.models.common.moe`):
softmax router *without* ``--moe-router-pre-softmax`` (HF renormalises the top-k softmax
weights, which equals a softmax over the top-k logits), no capacity factor (no token dropping).
``router_aux_loss_coef`` becomes ``--moe-aux-loss-coeff``; ``router_jitter_noise`` (0 in the
released models) becomes ``--moe-input-jitter-eps``, which jitters the router's input only
where HF also jitters the experts' input (training only).
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.mapping.rules import Rule
from megatron_patch.models.common.hf_config import (
    llama_style_to_megatron,
    megatron_to_llama_style,
    megatron_window,
    mistral_window,
)
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.common.moe import (
    MoEFamily,
    Router,
    aux_loss_coeff,
    moe_mlp_rules,
    moe_to_megatron,
    routed_experts,
)
from megatron_patch.models.mixtral.sizes import MIXTRAL_SIZES
from megatron_patch.models.registry import register_family


def _to_megatron(hf: HFConfig) -> MegatronArgs:
    args = llama_style_to_megatron(hf, window=mistral_window)
    router = Router(experts=routed_experts(hf, "num_local_experts"),
                    topk=int(hf.get("num_experts_per_tok") or 2))
    return {**args, **moe_to_megatron(
        router, ffn_hidden_size=args["ffn_hidden_size"], moe_layers=[1] * args["num_layers"],
        aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0),
        input_jitter=hf.get("router_jitter_noise"))}


def _to_hf(args: Any) -> HFConfig:
    return megatron_to_llama_style(
        args, "MixtralForCausalLM", "mixtral", sliding_window=megatron_window(args),
        num_local_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
        router_aux_loss_coef=aux_loss_coeff(args),
        router_jitter_noise=args.moe_input_jitter_eps or 0.0, output_router_logits=False)


def _mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    return llama_style_mapping(config, tie_embeddings) + moe_mlp_rules(
        "model.layers.*.block_sparse_moe.", router="gate", experts="experts", gate="w1",
        up="w3", down="w2")


MIXTRAL = register_family(
    MoEFamily(
        name="mixtral",
        hf_architectures=("MixtralForCausalLM",),
        hf_to_megatron=_to_megatron,
        megatron_to_hf=_to_hf,
        weight_mappings=_mapping,
        sizes=MIXTRAL_SIZES,
    )
)
