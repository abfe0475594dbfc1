"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): llama-style with a bias on q/k/v only.

Small sizes tie the embeddings; ``use_sliding_window`` is false in every released model.
"""

from functools import partial
from typing import Any

from megatron_patch.mapping.config import HFConfig
from megatron_patch.models.common.hf_config import (
    llama_style_to_megatron,
    megatron_to_llama_style,
    qwen_window,
    qwen_window_fields,
)
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.qwen2.sizes import QWEN2_SIZES
from megatron_patch.models.registry import ModelFamily, register_family


def _to_hf(args: Any) -> HFConfig:
    return megatron_to_llama_style(args, "Qwen2ForCausalLM", "qwen2", **qwen_window_fields(args))


QWEN2 = register_family(
    ModelFamily(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        hf_to_megatron=partial(llama_style_to_megatron, qkv_bias=True, window=qwen_window),
        megatron_to_hf=_to_hf,
        weight_mappings=llama_style_mapping,
        sizes=QWEN2_SIZES,
    )
)
