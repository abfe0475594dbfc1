"""The config half of a family's vocabulary: HF ``config.json`` <-> Megatron argument values.

A family maps an :data:`HFConfig` to :data:`MegatronArgs` and back; a field whose value it
cannot reproduce exactly raises :class:`UnsupportedConfigError` naming the field, never a
silently different model. This module imports nothing of megatron-patch.
"""

from __future__ import annotations

from typing import Any

HFConfig = dict[str, Any]
MegatronArgs = dict[str, Any]


class UnsupportedConfigError(ValueError):
    """An HF config field has a value megatron-patch cannot reproduce exactly."""
