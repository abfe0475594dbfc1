"""Decoder-layer variants registered through layer specs: parallel attention + MLP, post norms.

:func:`patched_layer_spec` reads the :class:`~megatron_patch.models.common.architecture.
PatchTransformerConfig` switches and returns Megatron-Core's standard layer spec when none is
set (Transformer Engine modules when installed). With a switch set it starts from the
torch-native spec and swaps in the modules below; these variants always use the torch-native
linears, norms and attention, which run on CPUs and GPUs alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    sharded_state_dict_default,
)
from megatron.core.utils import make_viewless_tensor

from megatron_patch.models.common.alibi import ALiBiAttention
from megatron_patch.models.common.norm import PatchNorm
from megatron_patch.models.common.spec import build_layer_spec
from megatron_patch.models.registry import ModelFamily


def _switch(config: TransformerConfig, name: str, default=False):
    """A PatchTransformerConfig switch (absent from other configs, e.g. MLA's: off)."""
    return getattr(config, name, default)


class ParallelAttentionMLPLayer(TransformerLayer):
    """``x + dropout(attention(norm(x)) + mlp(norm'(x)))`` (GPT-J, Falcon, ...).

    ``norm'`` is ``pre_mlp_layernorm`` when the spec gives one (Falcon's new decoder
    architecture: ``ln_attn``/``ln_mlp``), else the attention's ``input_layernorm`` output is
    reused (Falcon-7B). Cross-attention, Megatron's layernorm/MLP recompute modules and
    activation offloading do not apply to this layer; full-layer recompute does.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias: torch.Tensor | None = None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, *,
                inference_params=None):
        """Same signature and return value (``(output, context)``) as ``TransformerLayer``."""
        attention_input = self.input_layernorm(hidden_states)
        mlp_input = (attention_input if isinstance(self.pre_mlp_layernorm, IdentityOp)
                     else self.pre_mlp_layernorm(hidden_states))
        attention, attention_bias_out = self.self_attention(
            attention_input, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset, inference_params=inference_params)
        mlp, mlp_bias = self.mlp(mlp_input)
        biases = [b for b in (attention_bias_out, mlp_bias) if b is not None]
        bias = sum(biases[1:], biases[0]) if biases else None
        residual = hidden_states.float() if self.config.fp32_residual_connection \
            else hidden_states
        with self.bias_dropout_add_exec_handler():
            output = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                (attention + mlp, bias), residual, self.hidden_dropout)
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad,
                                      keep_graph=True)
        return output, context


def _post_norm(module: torch.nn.Module, output: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, None]:
    if bias is not None:
        output = output + bias
    return module.post_layernorm(output), None


class PostNormSelfAttention(SelfAttention):
    """Self-attention whose output (projection bias included) goes through ``post_layernorm``."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = PatchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """``SelfAttention.forward``, then the norm."""
        return _post_norm(self, *super().forward(*args, **kwargs))


class PostNormMLP(MLP):
    """MLP whose output (bias included) goes through ``post_layernorm``."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = PatchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """``MLP.forward``, then the norm."""
        return _post_norm(self, *super().forward(*args, **kwargs))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """``MLP``'s, with the norm replicated over tensor-parallel ranks.

        ``MLP.sharded_state_dict`` gives plain-torch children no tensor-parallel group, so
        every rank would claim the norm's main replica; it is redone with the group.
        """
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        state.update(sharded_state_dict_default(
            self.post_layernorm, f"{prefix}post_layernorm.", sharded_offsets,
            ensure_metadata_has_dp_cp_group(metadata), tp_group=self.tp_group))
        return state


def needs_patched_layer(config: TransformerConfig) -> bool:
    """Whether ``config`` sets a switch that changes the decoder layer."""
    return any(_switch(config, name) for name in
               ("alibi", "parallel_attention_mlp", "post_sublayer_norms"))


def patched_layer_spec(config: TransformerConfig, qk_layernorm: bool = False,
                       transformer_engine: bool | None = None) -> ModuleSpec:
    """The decoder-layer spec for ``config``'s architecture switches."""
    if not needs_patched_layer(config):
        return build_layer_spec(config, qk_layernorm, transformer_engine)
    if config.num_moe_experts:
        raise ValueError("ALiBi, parallel attention and post norms are not implemented for "
                         "MoE layers")
    spec = build_layer_spec(config, qk_layernorm, transformer_engine=False)
    layer = spec.submodules
    attention = layer.self_attention
    if _switch(config, "alibi"):
        attention.submodules.core_attention = ALiBiAttention
    if _switch(config, "post_sublayer_norms"):
        attention.module = PostNormSelfAttention
        layer.mlp = functools.partial(PostNormMLP.as_mlp_submodule, **layer.mlp.keywords)
    if _switch(config, "parallel_attention_mlp"):
        spec.module = ParallelAttentionMLPLayer
        if _switch(config, "parallel_attention_norms", 1) == 1:
            layer.pre_mlp_layernorm = IdentityOp
    return spec


@dataclass(frozen=True)
class PatchedFamily(ModelFamily):
    """A family whose layers follow :func:`patched_layer_spec`."""

    def layer_spec(self, config: TransformerConfig,
                   transformer_engine: bool | None = None) -> ModuleSpec:
        """Decoder-layer spec (see :func:`patched_layer_spec`)."""
        return patched_layer_spec(config, self.qk_layernorm, transformer_engine)
