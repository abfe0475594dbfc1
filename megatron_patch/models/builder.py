"""Build Megatron-Core models for a registered family from Megatron arguments."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import core_transformer_config_from_args

from megatron_patch.models.common.architecture import PatchTransformerConfig
from megatron_patch.models.common.gpt_model import PatchGPTModel
from megatron_patch.models.common.vision import VisionLanguageFamily
from megatron_patch.models.registry import ModelFamily, get_family
from megatron_patch.runtime.gpu_fast_paths import install_wgrad_accumulation


class _DropGPTModelDeprecation(logging.Filter):
    """GPTModel is the right engine for these decoders; keep its 0.19 deprecation notice quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "GPTModel IS DEPRECATED" not in record.getMessage()


logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_DropGPTModelDeprecation())


def family_from_args(args: argparse.Namespace) -> ModelFamily:
    """The family named by ``--model-family`` (llama when unset)."""
    return get_family(args.model_family or "llama")


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """Megatron's own args -> TransformerConfig translation (plus our architecture switches).

    Gradient-accumulation fusion stays on only where its kernel is available in this process:
    arguments saved by a GPU run (a checkpoint's) ask for it in processes that never installed
    the torch stand-in, e.g. ``convert mcore-to-hf``, where Megatron would refuse to build.
    """
    if args.gradient_accumulation_fusion:
        args.gradient_accumulation_fusion = install_wgrad_accumulation()
    return core_transformer_config_from_args(args, PatchTransformerConfig)


def build_gpt_model(
    args: argparse.Namespace,
    config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    transformer_engine: bool | None = None,
) -> GPTModel:
    """One model chunk (a pipeline stage, or a virtual stage with ``vp_stage``).

    ``transformer_engine``: force (True) or forbid (False) Transformer Engine modules; None
    uses them when installed.
    """
    family = family_from_args(args)
    if isinstance(family, VisionLanguageFamily):  # a multimodal model: tower, projector, LM
        return family.build_chunk(args, config, pre_process, post_process, vp_stage,
                                  transformer_engine)
    return PatchGPTModel(
        config=config,
        transformer_layer_spec=family.decoder_spec(config, vp_stage, transformer_engine),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        vp_stage=vp_stage,
    )


def gpt_model_provider(args: argparse.Namespace, transformer_engine: bool | None = None,
                       extend: Callable[[GPTModel], None] | None = None) -> Callable[..., GPTModel]:
    """Megatron ``get_model`` provider: :func:`build_gpt_model` chunks from ``args``, each
    passed to ``extend`` (e.g. to add or convert modules) before it is returned."""
    def provider(pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None, config=None, pg_collection=None) -> GPTModel:
        model = build_gpt_model(args, transformer_config_from_args(args), pre_process,
                                post_process, vp_stage, transformer_engine)
        if extend is not None:
            extend(model)
        return model

    return provider
