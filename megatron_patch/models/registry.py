"""Model-family registry: a family is data (config mapping, weight mapping) plus a layer spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.mapping.rules import Rule
from megatron_patch.models.common.sizes import ModelSize
from megatron_patch.models.common.spec import build_block_spec, build_layer_spec


@dataclass(frozen=True)
class ModelFamily:
    """Everything megatron-patch needs to know about one model family.

    Attributes:
        name: registry key, also the ``--model-family`` value.
        hf_architectures: HF ``architectures`` entries this family handles.
        hf_to_megatron: maps an HF ``config.json`` dict to Megatron argument values
            (``{"num_layers": 32, "swiglu": True, ...}``); raises on unsupported fields.
        megatron_to_hf: inverse of ``hf_to_megatron`` for writing ``config.json``.
        weight_mappings: ``(config, tie_embeddings)`` -> the declarative HF <-> Megatron
            parameter mapping.
        qk_layernorm: whether attention has per-head q/k norms.
        unconverted_hf_tensors: ``(hf_config, hf_tensor_names)`` -> the HF tensors the family
            knowingly does not convert and why (conversion warns instead of failing on them).
        sizes: the published models' ``config.json`` values, the launchers' ``MODEL_SIZE``
            (``models/<family>/sizes.py``).
    """

    name: str
    hf_architectures: tuple[str, ...]
    hf_to_megatron: Callable[[HFConfig], MegatronArgs]
    megatron_to_hf: Callable[[Any], HFConfig]
    weight_mappings: Callable[[TransformerConfig, bool], list[Rule]]
    qk_layernorm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    unconverted_hf_tensors: Callable[[HFConfig, list[str]], tuple[list[str], str]] | None = None
    sizes: tuple[ModelSize, ...] = ()

    def layer_spec(
        self, config: TransformerConfig, transformer_engine: bool | None = None
    ) -> ModuleSpec:
        """Decoder-layer spec for this family (Transformer Engine when installed, or as told)."""
        return build_layer_spec(config, self.qk_layernorm, transformer_engine)

    def decoder_spec(
        self,
        config: TransformerConfig,
        vp_stage: int | None = None,
        transformer_engine: bool | None = None,
    ) -> TransformerBlockSubmodules:
        """Decoder-block spec of one pipeline (virtual) stage."""
        return build_block_spec(config, self.layer_spec(config, transformer_engine), vp_stage,
                                transformer_engine)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family`` under its name; returns it for module-level assignment."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def _load_builtin_families() -> None:
    import megatron_patch.models.families  # noqa: F401  (registers on import)


def get_family(name: str) -> ModelFamily:
    """Look a family up by name (``llama``, ``qwen2``, ...)."""
    _load_builtin_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}"
        ) from None


def family_for_hf_config(hf_config: HFConfig) -> ModelFamily:
    """Find the family whose ``hf_architectures`` matches ``config.json['architectures']``."""
    _load_builtin_families()
    architectures = hf_config.get("architectures") or []
    for family in _FAMILIES.values():
        if any(arch in family.hf_architectures for arch in architectures):
            return family
    raise ValueError(
        f"config.json field 'architectures'={architectures} is not supported; supported: "
        f"{sorted(a for f in _FAMILIES.values() for a in f.hf_architectures)}"
    )


def registered_families() -> list[str]:
    """Names of all registered families."""
    _load_builtin_families()
    return sorted(_FAMILIES)
