"""Helpers shared by the config mappers and weight tables of the non-llama families.

:func:`decoder_args` writes the Megatron arguments every decoder has, so a family mapper only
reads its own ``config.json`` spelling; :func:`direct_rules` and :func:`replace_rules` keep the
weight tables one line per module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.mapping.rules import Direct, Rule

LAYER = "decoder.layers.*."
WEIGHT = ("weight",)
WEIGHT_BIAS = ("weight", "bias")


def field(hf: HFConfig, *names: str, default: Any = None) -> Any:
    """The first of ``names`` set in ``hf`` (configs spell fields several ways), else
    ``default``; a missing field without a default raises naming it."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    if default is None:
        raise UnsupportedConfigError(f"config.json: required field {names[0]!r} is missing")
    return default


def refuse(hf: HFConfig, name: str, value: Any, default: Any, why: str) -> None:
    """Raise naming ``name`` if ``hf`` sets it to ``value`` (its absence means ``default``)."""
    if hf.get(name, default) == value:
        raise UnsupportedConfigError(f"config.json: {name}={value!r} is not supported ({why})")


def decoder_args(*, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                 max_positions: int, norm: str, eps: float, tied: bool, bias: bool,
                 qkv_bias: bool | None = None, head_dim: int | None = None,
                 attention_dropout: float = 0.0, hidden_dropout: float = 0.0,
                 init_std: float = 0.02, **extra: Any) -> MegatronArgs:
    """Megatron argument values of a decoder; ``extra`` adds or overrides any of them.

    ``bias``: biases on every linear layer (Megatron's ``add_bias_linear``); ``qkv_bias``
    (default: ``bias``) on the q/k/v projection.
    """
    return {
        "num_layers": int(layers),
        "hidden_size": int(hidden),
        "ffn_hidden_size": int(ffn),
        "num_attention_heads": int(heads),
        "group_query_attention": int(kv_heads) != int(heads),
        "num_query_groups": int(kv_heads),
        "kv_channels": int(head_dim or hidden // heads),
        "max_position_embeddings": int(max_positions),
        "normalization": norm,
        "layernorm_epsilon": float(eps),
        "swiglu": False,
        "add_bias_linear": bool(bias),
        "add_qkv_bias": bool(bias if qkv_bias is None else qkv_bias),
        "qk_layernorm": False,
        "untie_embeddings_and_output_weights": not tied,
        "vocab_size": int(vocab),
        "attention_dropout": float(attention_dropout),
        "hidden_dropout": float(hidden_dropout),
        "init_method_std": float(init_std),
        **extra,
    }


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
