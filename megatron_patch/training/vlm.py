"""``vlm`` entry point: multimodal SFT of a vision-language family on Megatron-Core.

    torchrun ... -m megatron_patch.training.vlm --load CONVERTED --data-path chat.jsonl \\
        --patch-tokenizer-type HFTokenizer [--freeze-ViT] [--freeze-LM] [--freeze-projector] ...

``--data-path`` is a JSONL file of conversations with ``<image>`` placeholders
(:mod:`megatron_patch.data.multimodal`); ``--valid-data-path`` optionally another. The
architecture comes from the converted checkpoint's metadata or ``--hf-config-path``; the loss
covers the assistant turns (``--on-error`` handles bad samples as for text SFT).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from functools import partial

import torch

from megatron_patch.arguments import parse_training_args
from megatron_patch.data.multimodal import MultimodalSFTDataset
from megatron_patch.models.builder import family_from_args
from megatron_patch.models.common.vision import vlm_hf_config
from megatron_patch.training.loop import lm_loss, next_batch
from megatron_patch.training.pretrain import run_training


def vlm_forward_step(data_iterator: Iterator | None, model: torch.nn.Module):
    """Megatron forward step for :class:`MultimodalSFTDataset` micro-batches."""
    batch = next_batch(data_iterator)
    slots = torch.arange(batch["images"].shape[1], device=batch["images"].device)
    images = batch["images"][slots.unsqueeze(0) < batch["num_images"].unsqueeze(1)]
    tiles = torch.ones(images.shape[0], dtype=torch.int, device=images.device)
    output, loss_mask = model(images, batch["tokens"], None, None, labels=batch["labels"],
                              loss_mask=batch["loss_mask"], num_image_tiles=tiles)
    return output, partial(lm_loss, loss_mask)


def build_vlm_datasets(args: argparse.Namespace, tokenizer, num_samples: list[int]) -> list:
    """Train and (with ``--valid-data-path``) validation sets of conversations with images."""
    hf_config = vlm_hf_config(args)
    vlm = family_from_args(args).extra["vlm"]
    if not args.data_path or len(args.data_path) != 1:
        raise ValueError(f"--data-path must name one JSONL file of conversations, got "
                         f"{args.data_path}")
    settings = {"image_token_id": vlm.image_token_id(hf_config),
                "image_tokens": vlm.image_tokens(hf_config),
                "image_size": hf_config["vision_config"].get("image_size", 224),
                "seq_length": args.seq_length, "pad_id": tokenizer.pad,
                "on_error": args.on_error}
    train = MultimodalSFTDataset(args.data_path[0], tokenizer, **settings)
    valid = None
    if getattr(args, "valid_data_path", None):
        valid = MultimodalSFTDataset(args.valid_data_path[0], tokenizer, **settings)
    return [train, valid, None]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fine-tune a vision-language model; returns the last logged losses (last rank)."""
    args = parse_training_args(argv)
    if "vlm" not in family_from_args(args).extra:
        raise ValueError(f"--model-family {args.model_family} is not a vision-language family; "
                         "use megatron_patch.training.finetune for text models")
    if args.virtual_pipeline_model_parallel_size:
        raise ValueError("virtual pipeline stages are not supported for vision-language models "
                         "yet; drop --num-layers-per-virtual-pipeline-stage / "
                         "--num-virtual-stages-per-pipeline-rank")
    return run_training(args, build_vlm_datasets, vlm_forward_step)


if __name__ == "__main__":
    main()
