"""``vlm`` entry point: multimodal SFT of a vision-language family on Megatron-Core.

    torchrun ... -m megatron_patch.training.vlm --load CONVERTED --data-path chat.jsonl \\
        --patch-tokenizer-type HFTokenizer [--freeze-ViT] [--freeze-LM] [--freeze-projector] ...

``--data-path`` is a JSONL file of conversations with ``<image>`` placeholders
(:mod:`megatron_patch.data.multimodal`); ``--valid-data-path`` optionally another. The
architecture comes from the converted checkpoint's metadata or ``--hf-config-path``; the loss
covers the assistant turns (``--on-error`` handles bad samples as for text SFT). Each family
has its data and forward step (:data:`TRAINING`): LLaVA's square images, one token each, which
the model expands; Qwen2-VL's dynamic-resolution images (``--vlm-min-pixels``,
``--vlm-max-pixels``), expanded by the data, M-RoPE positions, and ``--sft-packing``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.utils import flatten_batch_for_packed_sequences

from megatron_patch.arguments import parse_training_args
from megatron_patch.data.multimodal import MultimodalSFTDataset
from megatron_patch.data.qwen2_vl import Qwen2VLSFTDataset, VisionTokens
from megatron_patch.data.qwen2_vl_images import image_patcher
from megatron_patch.models.builder import family_from_args
from megatron_patch.models.common.packed_seq import document_causal_mask
from megatron_patch.models.common.vision import vlm_hf_config
from megatron_patch.training.loop import ForwardStep, lm_loss, next_batch
from megatron_patch.training.pretrain import run_training


def llava_forward_step(data_iterator: Iterator | None, model: torch.nn.Module):
    """Megatron forward step for :class:`MultimodalSFTDataset` micro-batches (LLaVA)."""
    batch = next_batch(data_iterator)
    slots = torch.arange(batch["images"].shape[1], device=batch["images"].device)
    images = batch["images"][slots.unsqueeze(0) < batch["num_images"].unsqueeze(1)]
    tiles = torch.ones(images.shape[0], dtype=torch.int, device=images.device)
    output, loss_mask = model(images, batch["tokens"], None, None, labels=batch["labels"],
                              loss_mask=batch["loss_mask"], num_image_tiles=tiles)
    return output, partial(lm_loss, loss_mask)


def qwen2_vl_forward_step(data_iterator: Iterator | None, model: torch.nn.Module):
    """Megatron forward step for :class:`Qwen2VLSFTDataset` micro-batches.

    Packed rows run as one sequence of ``micro_batch_size * seq_length`` tokens (the shape the
    training loop's pipeline schedule uses for packed data) in which every document attends
    only to itself."""
    batch, mask = next_batch(data_iterator), None
    if "cu_seqlens" in batch:
        positions = batch.pop("position_ids").reshape(3, 1, -1)
        batch = flatten_batch_for_packed_sequences(batch)
        batch["position_ids"] = positions
        mask = document_causal_mask(batch["cu_seqlens"][0], 1, positions.shape[-1])
    images = batch["image_grid_thw"].shape[0] > 0
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   pixel_values=batch["pixel_values"] if images else None,
                   image_grid_thw=batch["image_grid_thw"] if images else None,
                   labels=batch["labels"], loss_mask=batch["loss_mask"], attention_mask=mask)
    return output, partial(lm_loss, batch["loss_mask"])


def _llava_data(args: argparse.Namespace, tokenizer, hf_config: dict, vlm
                ) -> Callable[[str], torch.utils.data.Dataset]:
    settings = {"image_token_id": vlm.image_token_id(hf_config),
                "image_tokens": vlm.image_tokens(hf_config),
                "image_size": hf_config["vision_config"].get("image_size", 224),
                "seq_length": args.seq_length, "pad_id": tokenizer.pad,
                "on_error": args.on_error}
    return partial(MultimodalSFTDataset, tokenizer=tokenizer, **settings)


def _qwen2_vl_data(args: argparse.Namespace, tokenizer, hf_config: dict, vlm
                   ) -> Callable[[str], torch.utils.data.Dataset]:
    directories = [args.patch_tokenizer_path, args.hf_config_path, args.load]
    patcher = image_patcher(hf_config, directories, args.vlm_min_pixels, args.vlm_max_pixels)
    return partial(Qwen2VLSFTDataset, tokenizer=tokenizer, patcher=patcher,
                   tokens=VisionTokens.from_hf(hf_config), seq_length=args.seq_length,
                   pad_id=tokenizer.pad, packing=args.sft_packing, on_error=args.on_error)


@dataclass(frozen=True)
class VLMTraining:
    """A vision-language family's data (``(args, tokenizer, hf_config, vlm)`` -> a dataset of
    a JSONL path), forward step, and whether it trains packed rows (``--sft-packing``)."""

    data: Callable[..., Callable[[str], torch.utils.data.Dataset]]
    forward_step: ForwardStep
    packing: bool


TRAINING = {"llava": VLMTraining(_llava_data, llava_forward_step, packing=False),
            "qwen2_vl": VLMTraining(_qwen2_vl_data, qwen2_vl_forward_step, packing=True)}


def vlm_training(args: argparse.Namespace) -> VLMTraining:
    """The :class:`VLMTraining` of ``--model-family`` (a clear error for other families)."""
    family = family_from_args(args)
    if "vlm" not in family.extra or family.name not in TRAINING:
        raise ValueError(f"--model-family {family.name} is not a vision-language family "
                         f"({', '.join(TRAINING)}); use megatron_patch.training.finetune for "
                         "text models")
    return TRAINING[family.name]


def build_vlm_datasets(args: argparse.Namespace, tokenizer, num_samples: list[int]) -> list:
    """Train and (with ``--valid-data-path``) validation sets of conversations with images."""
    if not args.data_path or len(args.data_path) != 1:
        raise ValueError(f"--data-path must name one JSONL file of conversations, got "
                         f"{args.data_path}")
    hf_config = vlm_hf_config(args)
    dataset = vlm_training(args).data(args, tokenizer, hf_config,
                                      family_from_args(args).extra["vlm"])
    train = dataset(args.data_path[0])
    valid = None
    if getattr(args, "valid_data_path", None):
        valid = dataset(args.valid_data_path[0])
    return [train, valid, None]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fine-tune a vision-language model; returns the last logged losses (last rank)."""
    args = parse_training_args(argv)
    training = vlm_training(args)
    if args.sft_packing and not training.packing:
        packed = ", ".join(name for name, entry in TRAINING.items() if entry.packing)
        raise ValueError(f"--sft-packing is not supported for --model-family "
                         f"{args.model_family} yet (only for {packed})")
    if args.context_parallel_size > 1:
        raise ValueError("context parallelism is not supported for vision-language models yet; "
                         "drop --context-parallel-size")
    if args.virtual_pipeline_model_parallel_size:
        raise ValueError("virtual pipeline stages are not supported for vision-language models "
                         "yet; drop --num-layers-per-virtual-pipeline-stage / "
                         "--num-virtual-stages-per-pipeline-rank")
    return run_training(args, build_vlm_datasets, training.forward_step)


if __name__ == "__main__":
    main()
