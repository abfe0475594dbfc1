"""LoRA in the training entry points: adapters added to each model chunk, a summary line."""

from __future__ import annotations

import argparse

import torch
from megatron.training.utils import print_rank_0

from megatron_patch.models.builder import family_from_args
from megatron_patch.models.common.lora import (
    LoraSettings,
    apply_lora,
    model_parallel_counts,
    settings_from_args,
)


def add_lora(chunk: torch.nn.Module, settings: LoraSettings, args: argparse.Namespace) -> None:
    """Adapters on ``chunk``'s targeted linears, everything else frozen (``extend_model``)."""
    rules = family_from_args(args).weight_mappings(
        chunk.config, not args.untie_embeddings_and_output_weights)
    apply_lora(chunk, settings, rules, chunk.config, args.seed)


def report_lora(model: list[torch.nn.Module], settings: LoraSettings, base: str) -> None:
    """One line: rank, alpha, targets, trainable parameters, and where the base comes from."""
    trainable, total = model_parallel_counts(model)
    print_rank_0(f"> LoRA rank {settings.rank}, alpha {settings.alpha:g}, dropout "
                 f"{settings.dropout:g} on {','.join(settings.targets)}: {trainable:,} of "
                 f"{total:,} parameters trained on this rank ({100 * trainable / total:.2f}%); "
                 f"frozen base from {base}; checkpoints hold the adapters only")


def load_lora_model(args: argparse.Namespace) -> list[torch.nn.Module]:
    """This rank's chunks of a LoRA model for inference (no DDP): base weights from the base
    checkpoint, adapters from ``--load`` when it holds them (else their initial, zero update)."""
    from megatron.core.enums import ModelType
    from megatron.training.training import get_model

    from megatron_patch.models.builder import gpt_model_provider
    from megatron_patch.training.checkpoint import load_megatron_checkpoint
    from megatron_patch.training.lora_checkpoint import is_adapter_checkpoint, use_base_checkpoint

    settings = settings_from_args(args)
    model = get_model(gpt_model_provider(args, transformer_engine=False,
                                         extend=lambda chunk: add_lora(chunk, settings, args)),
                      ModelType.encoder_or_decoder, wrap_with_ddp=False)
    use_base_checkpoint(model, args)
    if is_adapter_checkpoint(args.load):
        load_megatron_checkpoint(model, None, None)
    return model
