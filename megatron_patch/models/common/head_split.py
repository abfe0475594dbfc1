"""How tensor parallelism may share out key/value heads: one rule for the launcher, ``plan``,
training checks and conversion.

With at least as many key/value heads (query groups) as TP ranks, each rank holds
``groups / TP`` of them. With fewer (multi-query attention: StarCoder, Gemma-2B; GQA with
few groups), Megatron-Core (``Attention``, 0.19) splits the fused QKV projection's rows evenly
over the ranks, all-gathers its output and gives each rank its group's key/value head whole
with ``heads / TP`` of that group's query heads; the projection's gradient returns through the
all-gather's reduce-scatter, so no parameter is replicated and no extra reduction is needed.
This needs TP to be a multiple of the groups (a rank's query heads then share one key/value
head) and the fused rows, ``(heads + 2 * groups) * head_dim``, to split evenly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def kv_split_problem(heads: int, groups: int, head_dim: int, tp: int) -> str | None:
    """Why ``tp`` ranks cannot share out ``groups`` key/value heads of ``heads`` query heads
    of size ``head_dim`` (None: they can). TP dividing ``heads`` is checked by the caller."""
    if groups % tp == 0:
        return None
    if tp % groups:
        return (f"{groups} key/value heads cannot be shared out over {tp} ranks: TP must divide "
                "them, or be a multiple of them (else a rank's query heads would span two "
                "key/value heads; Megatron-Core's TransformerConfig refuses it)")
    rows = (heads + 2 * groups) * head_dim
    if rows % tp:
        return (f"the fused query/key/value projection's {rows} rows "
                f"((heads {heads} + 2 x {groups} key/value heads) x head size {head_dim}) do "
                f"not split evenly over {tp} ranks")
    return None


def model_kv_split_problem(model: Mapping[str, Any], tp: int) -> str | None:
    """:func:`kv_split_problem` of a model's Megatron arguments (a family mapping's values or
    Megatron's parsed flags); None also when TP does not divide the query heads (checked by
    the caller)."""
    heads = model.get("num_attention_heads")
    if not heads or heads % tp:
        return None
    groups = (model.get("num_query_groups") or heads) if model.get("group_query_attention",
                                                                   True) else heads
    head_dim = model.get("kv_channels") or (model.get("hidden_size") or 0) // heads
    return kv_split_problem(heads, groups, head_dim, tp)
