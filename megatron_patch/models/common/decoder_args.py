"""Helpers shared by the config mappers and weight tables of the non-llama families.

:func:`refuse` names a ``config.json`` field a family refuses and does not write back (the
fields it reads and writes are rows of its table, :mod:`~megatron_patch.models.common.hf_config`);
:func:`direct_rules` and :func:`replace_rules` keep the weight tables one line per module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from megatron_patch.mapping.config import HFConfig, UnsupportedConfigError
from megatron_patch.mapping.rules import Direct, Rule

LAYER = "decoder.layers.*."
WEIGHT = ("weight",)
WEIGHT_BIAS = ("weight", "bias")


def refuse(hf: HFConfig, name: str, value: Any, default: Any, why: str) -> None:
    """Raise naming ``name`` if ``hf`` sets it to ``value`` (its absence means ``default``)."""
    if hf.get(name, default) == value:
        raise UnsupportedConfigError(f"config.json: {name}={value!r} is not supported ({why})")


def direct_rules(megatron_prefix: str, hf_prefix: str, modules: Mapping[str, str],
                 suffixes: Iterable[str] = WEIGHT) -> list[Rule]:
    """One :class:`Direct` rule per ``{megatron module: hf module}`` and suffix."""
    return [Direct(f"{megatron_prefix}{megatron}.{suffix}", f"{hf_prefix}{hf}.{suffix}")
            for megatron, hf in modules.items() for suffix in suffixes]


def replace_rules(rules: Iterable[Rule], *replacements: Rule) -> list[Rule]:
    """``rules`` with the rule for each replacement's Megatron name swapped for it."""
    new = {rule.megatron: rule for rule in replacements}
    replaced = [new.pop(rule.megatron, rule) for rule in rules]
    if new:
        raise ValueError(f"no rule to replace for {sorted(new)}")
    return replaced


def output_layer_rules(tie_embeddings: bool, hf_name: str = "lm_head.weight") -> list[Rule]:
    """The separate output layer's rule; none when it is tied to the input embedding."""
    return [] if tie_embeddings else [Direct("output_layer.weight", hf_name)]
