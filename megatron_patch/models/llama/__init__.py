"""Llama 1/2/3/3.1/3.2, CodeLlama, Yi (``LlamaForCausalLM``)."""

from functools import partial

from megatron_patch.models.common.hf_config import (
    llama_style_to_megatron,
    megatron_to_llama_style,
)
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.llama.sizes import LLAMA_SIZES
from megatron_patch.models.registry import ModelFamily, register_family

LLAMA = register_family(
    ModelFamily(
        name="llama",
        hf_architectures=("LlamaForCausalLM",),
        hf_to_megatron=llama_style_to_megatron,
        megatron_to_hf=partial(
            megatron_to_llama_style, architecture="LlamaForCausalLM", model_type="llama"
        ),
        weight_mappings=llama_style_mapping,
        sizes=LLAMA_SIZES,
    )
)
