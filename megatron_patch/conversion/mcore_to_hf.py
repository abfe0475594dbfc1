"""Megatron-Core checkpoint (converted or trained; any TP/PP; either format) -> HF model."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from megatron_patch.conversion.checkpoint_defaults import has_tokenizer
from megatron_patch.conversion.engine import ConversionError
from megatron_patch.conversion.hf_io import (
    ShardedSafetensorsWriter,
    dtype_name,
    parse_dtype,
    parse_size,
)
from megatron_patch.conversion.layout import (
    build_layout,
    family_of,
    single_process_group,
    single_stage_args,
)
from megatron_patch.conversion.mcore_io import checkpoint_directory, open_checkpoint
from megatron_patch.conversion.vlm import convert_vlm_mcore_to_hf, vlm_family
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.common.vision import VisionLanguageFamily
from megatron_patch.models.registry import family_for_hf_config, get_family
from megatron_patch.tokenizer.hf import TINY_TOKENIZER_DIR
from megatron_patch.utils.files import atomic_directory, copy_model_files
from megatron_patch.utils.metadata import checkpoint_metadata


def convert_mcore_to_hf(
    mcore_dir: str | Path,
    out: str | Path,
    *,
    hf_template: str | Path | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> Path:
    """Write the Megatron checkpoint in ``mcore_dir`` as an HF model directory at ``out``.

    The architecture comes from the args saved in the checkpoint; ``config.json`` and the
    tokenizer files from ``hf_template`` if given, else from the conversion metadata and files
    in ``mcore_dir``. ``dtype`` defaults to the dtype of the original HF weights (if recorded),
    else to the checkpoint's. Vocabulary padding is stripped. Returns ``out``.
    """
    mcore_dir = Path(mcore_dir)
    metadata = checkpoint_metadata(mcore_dir) or {}
    template = load_hf_config(hf_template) if hf_template else None
    files_from = Path(hf_template) if hf_template else mcore_dir
    vlm = vlm_family(metadata, template)
    if vlm is not None:  # vision-language: conversion/vlm.py
        return convert_vlm_mcore_to_hf(mcore_dir, out, vlm, metadata, hf_template=hf_template,
                                       dtype=dtype, max_shard_size=max_shard_size,
                                       progress=progress)
    directory = checkpoint_directory(mcore_dir)
    with atomic_directory(out) as scratch, single_process_group(scratch):
        checkpoint = open_checkpoint(directory)
        if checkpoint.args is None:
            raise ConversionError(f"{directory}: the checkpoint holds no Megatron args")
        if metadata:
            family = get_family(metadata["family"])
        elif getattr(checkpoint.args, "model_family", None) or template is None:
            family = family_of(checkpoint.args)
        else:
            family = family_for_hf_config(template)
        if isinstance(family, VisionLanguageFamily):  # only without metadata or template
            raise ConversionError(f"{directory}: a {family.name} checkpoint without conversion "
                                  "metadata; pass the original model directory as --hf-template")
        args = single_stage_args(checkpoint.args, family)
        layout = build_layout(args, family, checkpoint.dtype)
        hf_config = template or metadata.get("hf_config") or family.megatron_to_hf(args)
        rows = int((template or {}).get("vocab_size") or metadata.get("vocab_rows")
                   or args.vocab_size or args.padded_vocab_size)
        out_dtype = parse_dtype(dtype or metadata.get("hf_dtype") or checkpoint.dtype)
        weights = layout.weight_map(hf_vocab_rows=rows)
        checkpoint.check(layout)
        writer = ShardedSafetensorsWriter(scratch, parse_size(max_shard_size))
        for group in tqdm(layout.groups(), desc="writing safetensors", unit="layer",
                          disable=not progress):
            tensors = checkpoint.load(group)
            for name in group:
                for hf_name, tensor in weights.to_hf(name, tensors.pop(name)).items():
                    writer.add(hf_name, tensor.to(out_dtype))
        writer.finish()
        config = {**hf_config, "vocab_size": rows, "dtype": dtype_name(out_dtype)}
        if "torch_dtype" in config:
            config["torch_dtype"] = config["dtype"]
        (scratch / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_model_files(files_from, scratch)
        if not has_tokenizer(scratch):
            _copy_training_tokenizer(checkpoint.args, scratch, out)
    return Path(out)


def _copy_training_tokenizer(args, scratch: Path, out: str | Path) -> None:
    """Copy the HF tokenizer the checkpoint was trained with; say so where there is none."""
    kind = getattr(args, "patch_tokenizer_type", None)
    path = getattr(args, "patch_tokenizer_path", None)
    source = TINY_TOKENIZER_DIR if kind == "TinyTokenizer" else path
    if kind in ("HFTokenizer", "TinyTokenizer") and source and Path(source).is_dir():
        copy_model_files(source, scratch)
        if has_tokenizer(scratch):
            return
    used = " ".join(str(part) for part in (kind, path) if part) or "no recorded tokenizer"
    print(f"note: no tokenizer written to {out} (the checkpoint was trained with {used}); copy "
          "the tokenizer files into it, or convert again with --hf-template DIR of the original "
          "model")

