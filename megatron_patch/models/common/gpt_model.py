"""Megatron-Core's ``GPTModel`` with the model-level architecture switches.

With every :class:`~megatron_patch.models.common.architecture.PatchTransformerConfig` switch off
(all families but the few that need one) :class:`PatchGPTModel` is ``GPTModel`` unchanged. The
switches attach to ``GPTModel``'s own submodules with forward hooks, so its forward, pipeline
stages, embedding/output-weight tying and checkpoint layout stay Megatron-Core's:

- ``embedding_layernorm``: ``embedding.word_embeddings_layernorm`` normalises the word
  embeddings before positions are added and dropout applies (Bloom);
- ``lm_head_norm``: the output layer multiplies by the L2-normalised rows of its weight, in
  training as in inference (Baichuan2's NormHead); each TP rank normalises its own rows;
- ``position_id_offset``: learned position embeddings are looked up at ``position + offset``
  in a table of ``max_sequence_length + offset`` rows (OPT);
- ``hf_rope_scaling``: the rotary embedding computes the frequencies of an HF rope type and
  attention scales cos/sin by its factor (:mod:`~megatron_patch.models.common.rope`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.models.common.norm import PatchNorm
from megatron_patch.models.common.rope import HFRotaryEmbedding, set_attention_scaling


def _shift_positions(offset: int, module: torch.nn.Module,
                     args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0] + offset, *args[1:])


def _normalise_output(norm: torch.nn.Module, module: torch.nn.Module, args: Any,
                      output: torch.Tensor) -> torch.Tensor:
    return norm(output)


def _normalised_weight(module: torch.nn.Module, args: tuple,
                       kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    weight = kwargs.get("weight")
    weight = module.weight if weight is None else weight
    return args, {**kwargs, "weight": F.normalize(weight, dim=-1)}


class PatchGPTModel(GPTModel):
    """``GPTModel`` (same constructor) plus the switches above."""

    def __init__(self, config: TransformerConfig, transformer_layer_spec: ModuleSpec,
                 vocab_size: int, max_sequence_length: int, *args: Any, **kwargs: Any):
        offset = getattr(config, "position_id_offset", 0)
        super().__init__(config, transformer_layer_spec, vocab_size,
                         max_sequence_length + offset, *args, **kwargs)
        rope = getattr(config, "hf_rope_scaling", None)
        if rope and self.position_embedding_type == "rope":
            self.rotary_pos_emb = HFRotaryEmbedding(
                rope, max_sequence_length, config.kv_channels, self.rotary_percent,
                self.rotary_base, rotary_interleaved=config.rotary_interleaved,
                use_cpu_initialization=config.use_cpu_initialization,
                cp_group=self.pg_collection.cp)
            set_attention_scaling(self, self.rotary_pos_emb.attention_scaling)
        embedding = getattr(self, "embedding", None)
        if embedding is not None and offset:
            embedding.position_embeddings.register_forward_pre_hook(
                functools.partial(_shift_positions, offset))
        if embedding is not None and getattr(config, "embedding_layernorm", False):
            norm = PatchNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
            # Sequence-parallel gradients need an all-reduce only if each rank normalises its
            # own tokens, i.e. when the embedding is reduce-scattered over the sequence.
            for param in norm.parameters():
                param.sequence_parallel = embedding.reduce_scatter_embeddings
            embedding.word_embeddings_layernorm = norm
            embedding.word_embeddings.register_forward_hook(
                functools.partial(_normalise_output, norm))
        if self.post_process and getattr(config, "lm_head_norm", False):
            # The normalised weight is not a parameter: its gradient must flow through autograd,
            # not into a fused main_grad accumulation.
            self.output_layer.gradient_accumulation_fusion = False
            self.output_layer.register_forward_pre_hook(_normalised_weight, with_kwargs=True)
