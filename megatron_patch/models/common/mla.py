"""Multi-Latent Attention (DeepSeek-V2/V3) layer specs: Megatron-Core's ``MLASelfAttention``.

Torch-native spec: column/row-parallel linears, :class:`~megatron_patch.models.common.norm.
PatchNorm` for the q and kv latent norms, :class:`MLACoreAttention` (SDPA) as core attention.
With Transformer Engine installed, Megatron-Core's own MLA spec (norms fused into the up
projections). The torch-native layer maps its state-dict keys onto Transformer Engine's
(``q_layernorm`` -> ``linear_q_up_proj.layer_norm_*``, ...), so ``torch_dist`` checkpoints load
on either.

Megatron-Core 0.19's MLA fuses a norm into ``linear_q_proj`` whenever ``qk_layernorm`` is set
and there is no q LoRA (``q_lora_rank`` None), but DeepSeek-V2-Lite's q projection has no norm
while its kv latent does; :class:`PatchMLASelfAttention` builds exactly the modules the spec
names instead.

Megatron-Core's torch-native MLA path (column-parallel down projections, their outputs gathered
over TP) loses gradient under sequence parallelism: the gathered ``k_pos_emb`` feeds this rank's
heads only, and the gather's backward (a split) never sums the other ranks' contributions.
:class:`SequenceShardDownProjection` computes the whole latent on the local sequence shard
instead (as Transformer Engine's duplicated linear does), so Megatron takes the path that
gathers ``k_pos_emb`` over the sequence and reduce-scatters its gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_patch.models.common.attention import SDPAttention
from megatron_patch.models.common.norm import PatchNorm
from megatron_patch.models.common.spec import torch_mlp_spec, use_transformer_engine

# Transformer Engine fuses the latent norms into the up projections (and, for dense layers,
# the pre-MLP norm into linear_fc1); the input norm stays a module of its own.
_TE_MLA_KEYS = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}
_TE_DENSE_MLP_KEYS = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class MLACoreAttention(SDPAttention):
    """:class:`SDPAttention` with MLA's constructor: key and value head sizes differ, which
    ``scaled_dot_product_attention`` reads off the tensors."""

    def __init__(self, *args: Any, k_channels: int | None = None,
                 v_channels: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)


class SequenceShardDownProjection(ColumnParallelLinear):
    """MLA down projection: column-parallel weights (checkpoint layout unchanged); under
    sequence parallelism the full latent of the local tokens, from the all-gathered weight
    (whose backward reduce-scatters, summing the ranks' partial weight gradients)."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        if not self.sequence_parallel or self.tp_group.size() == 1:
            return super().forward(input_, weight, runtime_gather_output)
        full = gather_from_sequence_parallel_region(self.weight if weight is None else weight,
                                                    tensor_parallel_output_grad=True,
                                                    group=self.tp_group)
        return F.linear(input_, full), None


class PatchMLASelfAttention(MLASelfAttention):
    """``MLASelfAttention`` built from exactly the projections and norms its spec names, with
    :class:`SequenceShardDownProjection` behaviour for column-parallel down projections."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for name in ("linear_q_down_proj", "linear_kv_down_proj"):
            module = getattr(self, name, None)
            if type(module) is ColumnParallelLinear:  # Megatron accepts only its own classes
                module.__class__ = SequenceShardDownProjection  # same state, new forward

    def _resolve_qk_norm_config(self, submodules: MLASelfAttentionSubmodules) -> dict:
        return {name: getattr(submodules, name) for name in (
            "linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj", "q_layernorm",
            "kv_layernorm")}


def mla_layer_spec(config: TransformerConfig, transformer_engine: bool | None = None,
                   moe: bool | None = None) -> ModuleSpec:
    """Decoder layer with Multi-Latent Attention; ``moe`` as in
    :func:`~megatron_patch.models.common.spec.build_layer_spec`."""
    experts = config.num_moe_experts if (moe is None or moe) else None
    if use_transformer_engine() if transformer_engine is None else transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=True,
            multi_latent_attention=True)
        if config.q_lora_rank is None:
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

            spec.submodules.self_attention.module = PatchMLASelfAttention
            spec.submodules.self_attention.submodules.linear_q_proj = TEColumnParallelLinear
        return spec
    attention = ModuleSpec(
        module=PatchMLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=MLACoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=PatchNorm,
            kv_layernorm=PatchNorm,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=PatchNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=PatchNorm,
            mlp=torch_mlp_spec(config, experts),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={**_TE_MLA_KEYS,
                                         **({} if experts else _TE_DENSE_MLP_KEYS)},
        ),
    )
