"""Baichuan-7B/13B and Baichuan2-7B/13B (``BaiChuanForCausalLM`` / ``BaichuanForCausalLM``).

Remote-code models, not in transformers. Their modelling code is Llama's mathematics with the
q/k/v projections stacked in one ``W_pack`` (``[q; k; v]``), except that

- the 13B models use ALiBi instead of rotary embeddings; their ``config.json`` has no
  ``max_position_embeddings`` (only ``model_max_length``), the 7B models have one;
- Baichuan2's ``lm_head`` is a NormHead: logits use the L2-normalised rows of its weight. Only
  Baichuan2's configuration writes ``z_loss_weight``, which is how Baichuan2 is recognised;
  its z-loss (training only) must be 0.

Baichuan-7B therefore is exactly ``LlamaForCausalLM`` with ``W_pack`` split, and the tests check
it (and Baichuan2's NormHead, and the 13B ALiBi layout against transformers' Bloom ALiBi) that way.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.mapping.rules import Rule, StackedQKV
from megatron_patch.models.baichuan.sizes import BAICHUAN_SIZES
from megatron_patch.models.common.decoder_args import LAYER, replace_rules
from megatron_patch.models.common.hf_config import llama_style_to_megatron, megatron_to_llama_style
from megatron_patch.models.common.layers import PatchedFamily
from megatron_patch.models.common.llama_style import llama_style_mapping
from megatron_patch.models.registry import register_family

_ALIBI_LENGTH = 4096  # Baichuan-13B's model_max_length default


def baichuan_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron arguments for a Baichuan / Baichuan2 ``config.json``."""
    if hf.get("z_loss_weight", 0):
        raise UnsupportedConfigError(f"config.json: z_loss_weight={hf['z_loss_weight']} is not "
                                     "supported (Baichuan2's z-loss; set it to 0)")
    if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
        raise UnsupportedConfigError("config.json: num_key_value_heads is not supported "
                                     "(Baichuan's W_pack is multi-head)")
    alibi = "max_position_embeddings" not in hf
    length = hf.get("max_position_embeddings") or hf.get("model_max_length") or _ALIBI_LENGTH
    args = llama_style_to_megatron({**hf, "max_position_embeddings": length})
    if alibi:
        args.update(position_embedding_type="none", alibi=True)
    return {**args, "lm_head_norm": "z_loss_weight" in hf}


def megatron_to_baichuan(args: Any) -> HFConfig:
    """Baichuan(2) ``config.json`` fields for Megatron arguments."""
    config = megatron_to_llama_style(args, "BaichuanForCausalLM", "baichuan",
                                     model_max_length=args.max_position_embeddings)
    if getattr(args, "alibi", False):
        for key in ("max_position_embeddings", "rope_parameters", "rope_theta"):
            config.pop(key)
    if getattr(args, "lm_head_norm", False):
        config["z_loss_weight"] = 0
    return config


def baichuan_mapping(config: TransformerConfig, tie_embeddings: bool) -> list[Rule]:
    """Llama's rules with the stacked ``W_pack``."""
    return replace_rules(llama_style_mapping(config, tie_embeddings),
                         StackedQKV(LAYER + "self_attention.linear_qkv.weight",
                                    "model.layers.*.self_attn.W_pack.weight"))


BAICHUAN = register_family(
    PatchedFamily(
        name="baichuan",
        hf_architectures=("BaichuanForCausalLM", "BaiChuanForCausalLM"),
        hf_to_megatron=baichuan_to_megatron,
        megatron_to_hf=megatron_to_baichuan,
        weight_mappings=baichuan_mapping,
        sizes=BAICHUAN_SIZES,
    )
)
