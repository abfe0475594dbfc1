"""Qwen3 (``Qwen3ForCausalLM``): llama-style with per-head q/k RMSNorm and no q/k/v bias.

``head_dim`` is independent of ``hidden_size / num_attention_heads`` (Megatron ``kv_channels``).
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
from megatron_patch.models.qwen3.sizes import QWEN3_SIZES
from megatron_patch.models.registry import ModelFamily, register_family


def _to_hf(args: Any) -> HFConfig:
    return megatron_to_llama_style(args, "Qwen3ForCausalLM", "qwen3", attention_bias=False,
                                   **qwen_window_fields(args))


QWEN3 = register_family(
    ModelFamily(
        name="qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        hf_to_megatron=partial(llama_style_to_megatron, qk_layernorm=True, window=qwen_window),
        megatron_to_hf=_to_hf,
        weight_mappings=llama_style_mapping,
        qk_layernorm=True,
        sizes=QWEN3_SIZES,
    )
)
