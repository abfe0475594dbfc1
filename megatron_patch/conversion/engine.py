"""The conversion engine shared by every family: declarative rules bound to a model's parameters.

A :class:`WeightMap` resolves each Megatron parameter (TP=1, PP=1 names) to the family rule that
produces it, knows which HF tensors it reads, pads/strips the vocabulary rows and checks shapes.
Both directions and every checkpoint format go through it, tensor by tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.rules import Index, Rule, rule_matches

# GPTModel's vocabulary-sized parameters: Megatron pads their rows, HF has exactly the vocab.
VOCAB_PARAMS = frozenset({"embedding.word_embeddings.weight", "output_layer.weight"})
# HF tensors that are derived buffers, not weights (old checkpoints saved RoPE frequencies;
# ChatGLM's remote code saves its one rotary table).
_IGNORED_HF = re.compile(
    r"^(model\.layers\.\d+\.self_attn\.rotary_emb|transformer\.rotary_pos_emb)\.inv_freq$")
_LISTED = 8


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted as (names, shapes, layout)."""


def check_hf_names(expected: Iterable[str], available: Iterable[str], source: str) -> None:
    """:func:`check_keys` for HF tensor names (derived buffers such as RoPE tables aside)."""
    check_keys(expected, (name for name in available if not _IGNORED_HF.match(name)), source)


@dataclass(frozen=True)
class Vocab:
    """Vocabulary rows on each side: ``hf_rows`` in the HF tensors, ``padded`` in Megatron's."""

    hf_rows: int
    padded: int


def _listing(names: list[str]) -> str:
    more = f" (+{len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return ", ".join(repr(n) for n in names[:_LISTED]) + more


def check_keys(expected: Iterable[str], found: Iterable[str], source: str) -> None:
    """Strict key check: raise naming the missing keys, then the unexpected ones."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ConversionError(f"{source}: missing {_listing(missing)}")
    if unexpected:
        raise ConversionError(f"{source}: unexpected {_listing(unexpected)} (not part of the "
                              "model its config describes)")


def rule_for(rules: Iterable[Rule], name: str) -> tuple[Rule, Index]:
    """The one rule of ``rules`` producing Megatron parameter ``name`` (TP=1, PP=1), with the
    layer (and expert) index it matched."""
    found = rule_matches(rules, name)
    if len(found) != 1:
        raise ConversionError(f"Megatron parameter {name!r} matches {len(found)} "
                              "weight-mapping rules (expected exactly one)")
    return found[0]


class WeightMap:
    """A family's rules resolved against the Megatron parameters ``shapes`` (TP=1, PP=1)."""

    def __init__(self, rules: Iterable[Rule], shapes: Mapping[str, torch.Size],
                 config: TransformerConfig, vocab: Vocab):
        self.config = config
        self.vocab = vocab
        self.shapes = dict(shapes)
        rules = list(rules)
        self._rules: dict[str, tuple[Rule, Index]] = {name: rule_for(rules, name)
                                                      for name in self.shapes}
        if vocab.hf_rows > vocab.padded:
            raise ConversionError(f"{vocab.hf_rows} vocabulary rows do not fit the Megatron "
                                  f"embedding of {vocab.padded} rows")

    def rule(self, name: str) -> tuple[Rule, Index]:
        """The rule producing Megatron parameter ``name`` and its layer (expert) index."""
        return self._rules[name]

    def hf_names(self, name: str) -> list[str]:
        """The HF tensors that make up Megatron parameter ``name``."""
        rule, layer = self._rules[name]
        return rule.hf_names(layer)

    def all_hf_names(self) -> set[str]:
        """Every HF tensor the model's parameters are built from (what a checkpoint holds)."""
        return {hf for name in self.shapes for hf in self.hf_names(name)}

    def to_megatron(self, name: str, hf: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Megatron parameter ``name`` (unsharded, vocabulary padded) from its HF tensors."""
        rule, layer = self._rules[name]
        tensor = rule.to_megatron(hf, layer, self.config)[name]
        if name in VOCAB_PARAMS:
            if tensor.shape[0] != self.vocab.hf_rows:
                raise ConversionError(f"{_listing(self.hf_names(name))}: {tensor.shape[0]} rows, "
                                      f"expected the vocabulary of {self.vocab.hf_rows}")
            padding = tensor.new_zeros(self.vocab.padded - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, padding])
        self._check_shape(name, tensor, f"built from {_listing(self.hf_names(name))}")
        return tensor

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The HF tensors of Megatron parameter ``name`` (vocabulary padding stripped)."""
        self._check_shape(name, tensor, "in the checkpoint")
        if name in VOCAB_PARAMS:
            tensor = tensor[: self.vocab.hf_rows]
        rule, layer = self._rules[name]
        return rule.to_hf(tensor, layer, self.config)

    def _check_shape(self, name: str, tensor: torch.Tensor, origin: str) -> None:
        if tensor.shape != self.shapes[name]:
            raise ConversionError(f"{name}: shape {tuple(tensor.shape)} {origin}, the model "
                                  f"expects {tuple(self.shapes[name])}")
