"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3 attention (per-head q/k RMSNorm, no bias), many
small routed experts, no shared expert.

Routing, dense layers and load balancing map as for Qwen2-MoE
(:mod:`megatron_patch.models.qwen2_moe`): softmax router, ``--moe-router-pre-softmax`` unless
``norm_topk_prob`` (true in the released models), no token dropping.
"""

from __future__ import annotations

from typing import Any

from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.models.common.hf_config import megatron_to_llama_style
from megatron_patch.models.common.moe import MoEFamily
from megatron_patch.models.qwen2_moe import qwen_moe_fields, qwen_moe_mapping, qwen_moe_to_megatron
from megatron_patch.models.qwen3_moe.sizes import QWEN3_MOE_SIZES
from megatron_patch.models.registry import register_family


def _to_megatron(hf: HFConfig) -> MegatronArgs:
    return qwen_moe_to_megatron(hf, shared=False, qk_layernorm=True)


def _to_hf(args: Any) -> HFConfig:
    return megatron_to_llama_style(args, "Qwen3MoeForCausalLM", "qwen3_moe",
                                   attention_bias=False, **qwen_moe_fields(args))


QWEN3_MOE = register_family(
    MoEFamily(
        name="qwen3_moe",
        hf_architectures=("Qwen3MoeForCausalLM",),
        hf_to_megatron=_to_megatron,
        megatron_to_hf=_to_hf,
        weight_mappings=qwen_moe_mapping,
        qk_layernorm=True,
        sizes=QWEN3_MOE_SIZES,
    )
)
