"""The published model sizes the launchers take as ``MODEL_SIZE``, read through the registry.

Each family's folder holds its sizes (``models/<family>/sizes.py``: the real Hugging Face
``config.json`` values, one :class:`ModelSize` each) and registers them with the family
(``ModelFamily.sizes``). Launchers turn a size into Megatron flags through the family's own
config mapper, so a size and a converted checkpoint of the same model always agree. ``tiny``
sizes are demo models that train in minutes on a CPU with the shipped tokenizer.
"""

from __future__ import annotations

from megatron_patch.mapping.config import HFConfig
from megatron_patch.models.common.sizes import ModelSize
from megatron_patch.models.registry import get_family, registered_families

__all__ = ["ModelSize", "family_sizes", "find_model", "find_size", "model_size_config"]


def family_sizes(family: str) -> tuple[ModelSize, ...]:
    """The sizes of ``family`` (empty if it has none or is not registered)."""
    return get_family(family).sizes if family in registered_families() else ()


def find_size(family: str, size: str) -> ModelSize:
    """``size`` of ``family``, by its MODEL_SIZE or model name (case-insensitive)."""
    wanted = size.lower()
    for model in family_sizes(family):
        if wanted in (model.size.lower(), model.name):
            return model
    known = [m.size for m in family_sizes(family)]
    raise ValueError(f"MODEL_SIZE={size!r} is not known for {family}; known: {known}")


def find_model(name: str) -> tuple[str, ModelSize]:
    """(family, model) for a model name such as ``qwen2.5-7b`` (case-insensitive)."""
    wanted = name.lower()
    for family in registered_families():
        for model in family_sizes(family):
            if model.name == wanted:
                return family, model
    known = [m.name for family in registered_families() for m in family_sizes(family)]
    raise ValueError(f"model {name!r} is not known; known: {known}")


def model_size_config(family: str, size: str) -> HFConfig:
    """The HF config of ``size`` for ``family``, with a clear error listing the known sizes."""
    return find_size(family, size).hf_config
