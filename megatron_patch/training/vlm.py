"""``vlm`` entry point: multimodal SFT of a vision-language family on Megatron-Core.

    torchrun ... -m megatron_patch.training.vlm --load CONVERTED --data-path chat.jsonl \\
        --patch-tokenizer-type HFTokenizer [--freeze-ViT] [--freeze-LM] [--freeze-projector] ...

``--data-path`` is a JSONL file of conversations with ``<image>`` placeholders
(:mod:`megatron_patch.data.multimodal`); ``--valid-data-path`` optionally another. The
architecture comes from the converted checkpoint's metadata or ``--hf-config-path``; the loss
covers the assistant turns (``--on-error`` handles bad samples as for text SFT). Each family
(:class:`~megatron_patch.models.common.vision.VisionLanguageFamily`) gives its forward step
and the form of its data: LLaVA's square images, one token each, which the model expands;
Qwen2-VL's dynamic-resolution images (``--vlm-min-pixels``, ``--vlm-max-pixels``), expanded
by the data, M-RoPE positions, and ``--sft-packing``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch

from megatron_patch.arguments import parse_training_args
from megatron_patch.data.multimodal import MultimodalSFTDataset
from megatron_patch.data.qwen2_vl import Qwen2VLSFTDataset, VisionTokens
from megatron_patch.data.qwen2_vl_images import image_patcher
from megatron_patch.models.builder import family_from_args
from megatron_patch.models.common.vision import VisionLanguageFamily, vlm_hf_config
from megatron_patch.models.registry import get_family, registered_families
from megatron_patch.training.loop import ForwardStep, lm_loss, next_batch
from megatron_patch.training.pretrain import run_training


def vlm_forward_step(data_iterator: Iterator | None, model: torch.nn.Module, *,
                     family: VisionLanguageFamily):
    """Megatron forward step of ``family``'s SFT micro-batches
    (:meth:`~megatron_patch.models.common.vision.VisionLanguageFamily.training_forward`)."""
    output, loss_mask = family.training_forward(model, next_batch(data_iterator))
    return output, partial(lm_loss, loss_mask)


def forward_step_for(family: VisionLanguageFamily) -> ForwardStep:
    """The training forward step of ``family``."""
    return partial(vlm_forward_step, family=family)


def sft_dataset(args: argparse.Namespace, tokenizer, hf_config: dict,
                family: VisionLanguageFamily) -> Callable[[str], torch.utils.data.Dataset]:
    """A dataset of a JSONL file of conversations for ``family``: square images of the tower's
    size, one placeholder each that the model expands (LLaVA), or images at their own
    resolution cut into patches, each placeholder repeated once per merged patch (Qwen2-VL)."""
    if not family.dynamic_resolution:
        settings = {"image_token_id": family.image_token_id(hf_config),
                    "image_tokens": family.image_tokens(hf_config),
                    "image_size": hf_config["vision_config"].get("image_size", 224),
                    "seq_length": args.seq_length, "pad_id": tokenizer.pad,
                    "on_error": args.on_error}
        return partial(MultimodalSFTDataset, tokenizer=tokenizer, **settings)
    directories = [args.patch_tokenizer_path, args.hf_config_path, args.load]
    patcher = image_patcher(hf_config, directories, args.vlm_min_pixels, args.vlm_max_pixels)
    return partial(Qwen2VLSFTDataset, tokenizer=tokenizer, patcher=patcher,
                   tokens=VisionTokens.from_hf(hf_config), seq_length=args.seq_length,
                   pad_id=tokenizer.pad, packing=args.sft_packing, on_error=args.on_error)


def vision_language_families() -> list[VisionLanguageFamily]:
    """The registered vision-language families."""
    return [f for f in map(get_family, registered_families())
            if isinstance(f, VisionLanguageFamily)]


def vlm_family(args: argparse.Namespace) -> VisionLanguageFamily:
    """The family of ``--model-family`` (a clear error for text families)."""
    family = family_from_args(args)
    if not isinstance(family, VisionLanguageFamily):
        names = ", ".join(f.name for f in vision_language_families())
        raise ValueError(f"--model-family {family.name} is not a vision-language family "
                         f"({names}); use megatron_patch.training.finetune for text models")
    return family


def build_vlm_datasets(args: argparse.Namespace, tokenizer, num_samples: list[int]) -> list:
    """Train and (with ``--valid-data-path``) validation sets of conversations with images."""
    if not args.data_path or len(args.data_path) != 1:
        raise ValueError(f"--data-path must name one JSONL file of conversations, got "
                         f"{args.data_path}")
    dataset = sft_dataset(args, tokenizer, vlm_hf_config(args), vlm_family(args))
    train = dataset(args.data_path[0])
    valid = None
    if getattr(args, "valid_data_path", None):
        valid = dataset(args.valid_data_path[0])
    return [train, valid, None]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fine-tune a vision-language model; returns the last logged losses (last rank)."""
    args = parse_training_args(argv)
    family = vlm_family(args)
    if args.sft_packing and not family.packing:
        packed = ", ".join(f.name for f in vision_language_families() if f.packing)
        raise ValueError(f"--sft-packing is not supported for --model-family "
                         f"{args.model_family} yet (only for {packed})")
    if args.context_parallel_size > 1:
        raise ValueError("context parallelism is not supported for vision-language models yet; "
                         "drop --context-parallel-size")
    if args.virtual_pipeline_model_parallel_size:
        raise ValueError("virtual pipeline stages are not supported for vision-language models "
                         "yet; drop --num-layers-per-virtual-pipeline-stage / "
                         "--num-virtual-stages-per-pipeline-rank")
    return run_training(args, build_vlm_datasets, forward_step_for(family))


if __name__ == "__main__":
    main()
