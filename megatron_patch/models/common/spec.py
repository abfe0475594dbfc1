"""Layer specs shared by every family: Transformer Engine when installed, torch-native otherwise."""

from __future__ import annotations

from functools import partial

from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_with_transformer_engine_spec,
    get_mlp_module_spec_for_backend,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    MlpBuilder,
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_patch.models.common.attention import SDPAttention
from megatron_patch.models.common.grouped_experts import GroupedGemmExperts
from megatron_patch.models.common.norm import PatchNorm

# Same key mapping as Megatron's own local spec, so torch_dist checkpoints written with the
# torch-native spec and with the Transformer Engine spec are interchangeable.
TE_COMPATIBLE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class TorchSpecProvider(LocalSpecProvider):
    """Megatron-Core local modules with our SP-capable norms and SDPA core attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        """Norm builder (RMSNorm/LayerNorm follow ``config.normalization``)."""
        return PatchNorm

    def core_attention(self) -> type:
        """Core attention module."""
        return SDPAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        """Routed experts: ``SequentialMLP``'s modules computed with grouped GEMMs."""
        return partial(GroupedGemmExperts, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def use_transformer_engine() -> bool:
    """Whether Transformer Engine modules are used for the layer specs."""
    return HAVE_TE


def build_layer_spec(
    config: TransformerConfig, qk_layernorm: bool = False, transformer_engine: bool | None = None,
    moe: bool | None = None,
) -> ModuleSpec:
    """Return the decoder-layer spec for ``config`` on the best available backend.

    ``transformer_engine=False`` forces the torch-native modules (checkpoint conversion builds
    its parameter layout from them; their ``torch_dist`` keys equal Transformer Engine's).
    ``moe``: a mixture-of-experts (True) or dense (False) layer; default: MoE if ``config`` has
    experts. A MoE layer keeps its own ``pre_mlp_layernorm`` (Transformer Engine fuses it into
    ``linear_fc1`` only for dense layers), so only the input norm's key is remapped.
    """
    experts = config.num_moe_experts if (moe is None or moe) else None
    if use_transformer_engine() if transformer_engine is None else transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
        )
    backend = TorchSpecProvider()
    norm = backend.layer_norm()
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=norm if qk_layernorm else IdentityOp,
            k_layernorm=norm if qk_layernorm else IdentityOp,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=torch_mlp_spec(config, experts),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=te_compatible_keys(experts),
        ),
    )


def torch_mlp_spec(config: TransformerConfig, experts: int | None) -> MlpBuilder:
    """Torch-native dense MLP (``experts`` None) or MoE layer with grouped-GEMM experts."""
    return get_mlp_module_spec_for_backend(
        backend=TorchSpecProvider(), num_experts=experts, moe_grouped_gemm=config.moe_grouped_gemm)


def te_compatible_keys(experts: int | None) -> dict[str, str]:
    """``sharded_state_dict_keys_map`` giving a torch-native layer Transformer Engine's keys."""
    keys = dict(TE_COMPATIBLE_KEYS)
    if experts:
        keys.pop("pre_mlp_layernorm.")
    return keys


def build_block_spec(
    config: TransformerConfig,
    layer_spec: ModuleSpec | list[ModuleSpec],
    vp_stage: int | None = None,
    transformer_engine: bool | None = None,
) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline (virtual) stage, with the backend's final norm.

    ``layer_spec``: one spec for every layer, or a list with one per layer of the whole model
    (e.g. dense and mixture-of-experts layers), of which this stage's are taken.
    """
    if use_transformer_engine() if transformer_engine is None else transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = PatchNorm
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    if isinstance(layer_spec, list):
        first = get_transformer_layer_offset(config, vp_stage=vp_stage)
        return TransformerBlockSubmodules(layer_specs=layer_spec[first:first + layers],
                                          layer_norm=final_norm)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=final_norm)
