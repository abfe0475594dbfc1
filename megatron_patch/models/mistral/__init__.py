"""Mistral (``MistralForCausalLM``): llama-style, with sliding-window attention.

A ``sliding_window`` that is null or covers ``max_position_embeddings`` is a no-op; a smaller one
becomes Megatron's ``window_size`` (Transformer Engine attention on GPUs, a window mask in
:class:`~megatron_patch.models.common.attention.SDPAttention` otherwise).
"""

from functools import partial
from typing import Any

from megatron_patch.mapping.config import HFConfig
from megatron_patch.models.common.hf_config import (
    llama_style_to_megatron,
    megatron_to_llama_style,
    megatron_window,
    mistral_window,
)
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.mistral.sizes import MISTRAL_SIZES
from megatron_patch.models.registry import ModelFamily, register_family


def _to_hf(args: Any) -> HFConfig:
    return megatron_to_llama_style(args, "MistralForCausalLM", "mistral",
                                   sliding_window=megatron_window(args))


MISTRAL = register_family(
    ModelFamily(
        name="mistral",
        hf_architectures=("MistralForCausalLM",),
        hf_to_megatron=partial(llama_style_to_megatron, window=mistral_window),
        megatron_to_hf=_to_hf,
        weight_mappings=llama_style_mapping,
        sizes=MISTRAL_SIZES,
    )
)
