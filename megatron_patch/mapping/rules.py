"""Declarative HF <-> Megatron-Core parameter mappings.

A family's weight mapping is a list of rules: any object of the :class:`Rule` protocol, such as
the ones below. Names use ``*`` for the layer index, e.g.
``Direct("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight")``;
per-expert rules have a second ``*`` for the expert index
(``decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight``), and a rule's ``layer``
argument is then the tuple ``(layer, expert)``.
Megatron names are those of an unsharded (TP=1, PP=1) model with the torch-native spec;
tensor-parallel sharding is applied separately (:mod:`megatron_patch.utils.sharding`).

Vision-language families add rules of their own shapes (:class:`ClassToken`,
:class:`Reshaped`), rules applied with the vision tower's config (:class:`OwnConfig`) and
vocabulary rows padded to Megatron's (:class:`VocabRows`); :func:`renamed` reuses a text
family's rules under a prefix.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

Tensors = dict[str, torch.Tensor]


Index = int | tuple[int, ...] | None


@runtime_checkable
class Rule(Protocol):
    """How the HF tensors of one Megatron parameter pattern map to it and back.

    ``megatron`` is the parameter's name pattern (``*`` per index); the conversion engine
    matches every parameter of the model to exactly one rule, then asks it which HF tensors it
    reads (:meth:`hf_names`) and converts in either direction. ``layer`` is the index (or the
    indices) the ``*`` stand for; ``config`` is the model's ``TransformerConfig``.
    """

    @property
    def megatron(self) -> str:
        """The Megatron parameter name pattern."""
        ...

    def hf_names(self, layer: Index) -> list[str]:
        """HF tensor names this rule reads for ``layer``."""
        ...

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """The Megatron tensor(s) built from the HF tensors ``hf``."""
        ...

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """The HF tensor(s) of the Megatron ``tensor``."""
        ...


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


def rule_matches(rules: Iterable[Rule], name: str) -> list[tuple[Rule, Index]]:
    """Every rule of ``rules`` whose Megatron pattern matches parameter ``name`` (TP=1, PP=1),
    with the layer (and expert) index it matched; a family's mapping has exactly one."""
    found = []
    for rule in rules:
        if match := layer_regex(rule.megatron).match(name):
            indices = tuple(int(group) for group in match.groups())
            found.append((rule, indices[0] if len(indices) == 1 else indices or None))
    return found


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


@dataclass(frozen=True)
class ClassToken:
    """HF ``class_embedding`` ``[h]`` <-> Megatron ``class_token`` ``[1, 1, h]``."""

    megatron: str
    hf: str

    def hf_names(self, layer: Index) -> list[str]:
        """The HF tensor name."""
        return [self.hf]

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """Add the two leading axes."""
        return {self.megatron: hf[self.hf].reshape(1, 1, -1)}

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """Drop the two leading axes."""
        return {self.hf: tensor.reshape(-1).contiguous()}


@dataclass(frozen=True)
class Reshaped:
    """One HF tensor is one Megatron tensor of the same elements in another shape (e.g. a
    3-D convolution over exactly one patch as a linear map of the flattened patch)."""

    megatron: str
    hf: str
    megatron_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]

    def hf_names(self, layer: Index) -> list[str]:
        """The HF tensor name."""
        return [self.hf]

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """The HF tensor in the Megatron shape."""
        return {self.megatron: hf[self.hf].reshape(self.megatron_shape)}

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """The Megatron tensor in the HF shape."""
        return {self.hf: tensor.reshape(self.hf_shape).contiguous()}


@dataclass(frozen=True)
class OwnConfig:
    """``rule`` applied with ``config`` (e.g. the vision tower's heads) instead of the map's."""

    rule: Rule
    config: TransformerConfig

    @property
    def megatron(self) -> str:
        """The wrapped rule's Megatron name pattern."""
        return self.rule.megatron

    def hf_names(self, layer: Index) -> list[str]:
        """HF tensor names the wrapped rule reads."""
        return self.rule.hf_names(layer)

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """The wrapped rule's Megatron tensor(s), built with this rule's config."""
        return self.rule.to_megatron(hf, layer, self.config)

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """The wrapped rule's HF tensor(s), split with this rule's config."""
        return self.rule.to_hf(tensor, layer, self.config)


@dataclass(frozen=True)
class VocabRows:
    """A vocabulary-sized one-to-one tensor: Megatron pads ``hf_rows`` rows to ``padded``."""

    megatron: str
    hf: str
    hf_rows: int
    padded: int

    def hf_names(self, layer: Index) -> list[str]:
        """The HF tensor name."""
        return [self.hf]

    def to_megatron(self, hf: Tensors, layer: Index, config: TransformerConfig) -> Tensors:
        """The HF rows, zero-padded to the Megatron vocabulary."""
        tensor = hf[self.hf]
        if tensor.shape[0] != self.hf_rows:
            raise ValueError(f"{self.hf}: {tensor.shape[0]} rows, expected the vocabulary of "
                             f"{self.hf_rows}")
        padding = tensor.new_zeros(self.padded - self.hf_rows, *tensor.shape[1:])
        return {self.megatron: torch.cat([tensor, padding])}

    def to_hf(self, tensor: torch.Tensor, layer: Index, config: TransformerConfig) -> Tensors:
        """The vocabulary rows without Megatron's padding."""
        return {self.hf: tensor[: self.hf_rows].contiguous()}


def vocab_rows(rules: list[Rule], names: tuple[str, ...], hf_rows: int, padded: int
               ) -> list[Rule]:
    """``rules`` with the one-to-one rules of Megatron tensors ``names`` padding their rows."""
    return [VocabRows(r.megatron, r.hf, hf_rows, padded) if r.megatron in names else r
            for r in rules]


# Fields of the rules above that hold HF name patterns (what :func:`renamed` rewrites).
_HF_FIELDS = ("hf", "q", "k", "v", "gate", "up")


def renamed(rules: list[Rule], megatron: str, hf: Callable[[str], str]) -> list[Rule]:
    """``rules`` with ``megatron`` prepended to their Megatron names and ``hf`` applied to their
    HF names (e.g. ``model.layers.*...`` -> ``language_model.model.layers.*...``)."""
    out = []
    for rule in rules:
        changes = {"megatron": megatron + rule.megatron}
        changes.update({f: hf(getattr(rule, f)) for f in _HF_FIELDS if hasattr(rule, f)})
        out.append(dataclasses.replace(rule, **changes))
    return out
