"""Published model sizes: the real Hugging Face ``config.json`` values of each, one entry each.

A family's folder lists its sizes (``models/<family>/sizes.py``) and registers them with the
family (``ModelFamily.sizes``); launchers read them through the registry and turn a size into
Megatron flags through the family's own config mapper, so a size and a converted checkpoint of
the same model always agree. ``tiny`` sizes are demo models that train in minutes on a CPU with
the shipped tokenizer (vocabulary 2048, :data:`TINY`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")

# The demo models' vocabulary (the shipped tokenizer's), context and rope base.
TINY = {"vocab_size": 2048, "max_position_embeddings": 2048, "rope_theta": 10000.0}


@dataclass(frozen=True)
class ModelSize:
    """One published model: its name, its ``MODEL_SIZE`` within its family, its config.json."""

    name: str  # canonical, lower case, as ``megatron-patch plan --model`` takes it
    size: str  # the launcher's MODEL_SIZE within the family
    hf_config: dict[str, Any]

    @property
    def is_moe(self) -> bool:
        """Whether the model has routed experts."""
        return any(key in self.hf_config for key in _EXPERT_FIELDS)


def decoder_config(architecture: str, model_type: str, hidden: int, layers: int, heads: int,
                   kv_heads: int, ffn: int, **extra: Any) -> dict[str, Any]:
    """The ``config.json`` of a llama-shaped decoder (SiLU MLP) of this shape; ``extra`` adds
    or replaces fields."""
    return {"architectures": [architecture], "model_type": model_type, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "hidden_act": "silu",
            "initializer_range": 0.02, "attention_dropout": 0.0, **extra}
