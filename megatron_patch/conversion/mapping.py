"""Declarative HF <-> Megatron-Core parameter mappings.

A family's weight mapping is a list of these rules. Names use ``*`` for the layer index, e.g.
``Direct("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight")``;
per-expert rules have a second ``*`` for the expert index
(``decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight``), and a rule's ``layer``
argument is then the tuple ``(layer, expert)``.
Megatron names are those of an unsharded (TP=1, PP=1) model with the torch-native spec;
tensor-parallel sharding is applied separately (:mod:`megatron_patch.conversion.sharding`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

Tensors = dict[str, torch.Tensor]


Index = int | tuple[int, ...] | None


def _fill(pattern: str, layer: Index) -> str:
    """``pattern`` with its ``*`` replaced, in order, by the index (or indices) of ``layer``."""
    if layer is None:
        return pattern
    for value in layer if isinstance(layer, tuple) else (layer,):
        pattern = pattern.replace("*", str(value), 1)
    return pattern


def layer_regex(pattern: str) -> re.Pattern[str]:
    """Regex matching ``pattern`` with each ``*`` capturing an index (layer, then expert)."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


@dataclass(frozen=True)
class Direct:
    """One HF tensor is one Megatron tensor."""

    megatron: str
    hf: str

    def hf_names(self, layer: Index) -> list[str]:
        """HF tensor names this rule reads for ``layer``."""
        return [_fill(self.hf, layer)]

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """Build the Megatron tensor(s) from HF tensors."""
        return {_fill(self.megatron, layer): hf[_fill(self.hf, layer)]}

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """Split a Megatron tensor back into HF tensor(s)."""
        return {_fill(self.hf, layer): tensor}


@dataclass(frozen=True)
class FusedQKV:
    """HF q/k/v projections <-> Megatron's fused ``linear_qkv`` (grouped per query group).

    Megatron stores, for each of the ``ng`` query groups, that group's query heads followed
    by its key head and value head: ``[ng, (heads/ng + 2) * head_dim, ...]``.
    """

    megatron: str
    q: str
    k: str
    v: str

    def hf_names(self, layer: Index) -> list[str]:
        """HF tensor names this rule reads for ``layer``."""
        return [_fill(n, layer) for n in (self.q, self.k, self.v)]

    @staticmethod
    def _shape(config: TransformerConfig) -> tuple[int, int, int]:
        groups = config.num_query_groups or config.num_attention_heads
        return groups, config.num_attention_heads // groups, config.kv_channels

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """Interleave q, k, v per query group."""
        groups, per_group, head_dim = self._shape(config)
        q, k, v = (hf[n] for n in self.hf_names(layer))
        tail = q.shape[1:]
        fused = torch.cat(
            [
                q.reshape(groups, per_group * head_dim, *tail),
                k.reshape(groups, head_dim, *tail),
                v.reshape(groups, head_dim, *tail),
            ],
            dim=1,
        )
        return {_fill(self.megatron, layer): fused.reshape(-1, *tail)}

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """Undo the per-group interleave."""
        groups, per_group, head_dim = self._shape(config)
        tail = tensor.shape[1:]
        grouped = tensor.reshape(groups, (per_group + 2) * head_dim, *tail)
        q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
        names = self.hf_names(layer)
        return {
            names[0]: q.reshape(-1, *tail).contiguous(),
            names[1]: k.reshape(-1, *tail).contiguous(),
            names[2]: v.reshape(-1, *tail).contiguous(),
        }


@dataclass(frozen=True)
class GatedMLP:
    """HF gate/up projections <-> Megatron's ``linear_fc1`` holding ``[gate; up]``."""

    megatron: str
    gate: str
    up: str

    def hf_names(self, layer: Index) -> list[str]:
        """HF tensor names this rule reads for ``layer``."""
        return [_fill(self.gate, layer), _fill(self.up, layer)]

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """Concatenate gate and up."""
        gate, up = (hf[n] for n in self.hf_names(layer))
        return {_fill(self.megatron, layer): torch.cat([gate, up], dim=0)}

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """Split into gate and up."""
        gate, up = torch.chunk(tensor, 2, dim=0)
        names = self.hf_names(layer)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}


@dataclass(frozen=True)
class StackedQKV:
    """One HF tensor of q, k and v rows one after another, ``[q; k; v]`` (Baichuan's ``W_pack``,
    ChatGLM's ``query_key_value``) <-> Megatron's fused ``linear_qkv``.

    Layouts that interleave q/k/v per head or per group (Bloom, Falcon) already are Megatron's
    and map with :class:`Direct`.
    """

    megatron: str
    hf: str

    def hf_names(self, layer: Index) -> list[str]:
        """HF tensor names this rule reads for ``layer``."""
        return [_fill(self.hf, layer)]

    def _fused(self) -> FusedQKV:
        return FusedQKV(self.megatron, "q", "k", "v")

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """Split the stack into q, k, v and interleave them per query group."""
        groups, per_group, head_dim = FusedQKV._shape(config)
        sizes = [groups * per_group * head_dim, groups * head_dim, groups * head_dim]
        q, k, v = torch.split(hf[_fill(self.hf, layer)], sizes)
        return self._fused().to_megatron({"q": q, "k": k, "v": v}, layer, config)

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """Undo the per-group interleave and stack q, k, v."""
        parts = self._fused().to_hf(tensor, layer, config)
        return {_fill(self.hf, layer): torch.cat([parts["q"], parts["k"], parts["v"]])}


Rule = Direct | FusedQKV | GatedMLP | StackedQKV
