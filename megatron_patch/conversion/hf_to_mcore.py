"""Hugging Face model directory -> Megatron-Core release checkpoint."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import torch

from megatron_patch.conversion.engine import ConversionError, check_hf_names
from megatron_patch.conversion.hf_io import HFCheckpoint, dtype_name, parse_dtype
from megatron_patch.conversion.layout import (
    build_layout,
    check_parallel_layout,
    hf_embedding_name,
    parse_megatron_args,
    pipeline_chunks,
    single_process_group,
)
from megatron_patch.conversion.legacy import save_legacy
from megatron_patch.conversion.mcore_io import size_vocabulary, stored_args
from megatron_patch.conversion.torch_dist import save_torch_dist
from megatron_patch.conversion.vlm import convert_vlm_hf_to_mcore
from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.models.builder import transformer_config_from_args
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.common.vision import VisionLanguageFamily
from megatron_patch.models.registry import ModelFamily, family_for_hf_config
from megatron_patch.parallel_layout import ParallelLayout
from megatron_patch.utils.files import atomic_directory, copy_model_files
from megatron_patch.utils.metadata import TRACKER_FILE, write_checkpoint_metadata

FORMATS = ("torch_dist", "legacy")


def _layout_values(tp: int, pp: int, vpp: int | None, first: int | None,
                   last: int | None, ep: int = 1, etp: int | None = None) -> MegatronArgs:
    values = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
              "num_virtual_stages_per_pipeline_rank": vpp,
              "decoder_first_pipeline_num_layers": first,
              "decoder_last_pipeline_num_layers": last,
              "expert_model_parallel_size": ep if ep > 1 else None,
              "expert_tensor_parallel_size": etp}
    return {key: value for key, value in values.items() if value is not None}


def unconverted_removed(family: ModelFamily, hf_config: HFConfig,
                        reader: HFCheckpoint) -> list[str]:
    """The checkpoint's tensor names without those the family knowingly does not convert
    (warned about, e.g. DeepSeek-V3's multi-token-prediction layers)."""
    names = reader.names
    if family.unconverted_hf_tensors is None:
        return names
    dropped, reason = family.unconverted_hf_tensors(hf_config, names)
    if dropped:
        shown = ", ".join(sorted(dropped)[:3]) + (", ..." if len(dropped) > 3 else "")
        warnings.warn(f"{reader.hf_dir}: {len(dropped)} tensors are not converted ({shown}): "
                      f"{reason}", stacklevel=2)
    return sorted(set(names) - set(dropped))


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: str | torch.dtype | None = None,
    extra_vocab_size: int = 0,
    make_vocab_size_divisible_by: int = 128,
    ckpt_format: str = "torch_dist",
    decoder_first_pipeline_num_layers: int | None = None,
    decoder_last_pipeline_num_layers: int | None = None,
    ep: int = 1,
    etp: int | None = None,
    progress: bool = True,
) -> Path:
    """Convert the HF model in ``hf_dir`` into a Megatron release checkpoint at ``out``.

    ``torch_dist`` (default) loads at any TP/PP/VPP/EP/ETP; ``tp`` still sets the vocabulary
    padding (``make_vocab_size_divisible_by * tp``) and ``tp``..``etp`` the layout recorded in
    the metadata. ``legacy`` writes ``release/mp_rank_XX[_YYY][_ZZZ]/model_optim_rng.pt`` for
    exactly ``tp``/``pp``/``vpp``/``ep`` (expert parallelism ``ep``; expert tensor parallelism
    ``etp``, default ``tp``). ``dtype`` defaults to that of the HF weights. Returns ``out``.
    """
    if ckpt_format not in FORMATS:
        raise ValueError(f"ckpt_format={ckpt_format!r}; use one of {FORMATS}")
    hf_dir = Path(hf_dir)
    hf_config = load_hf_config(hf_dir)
    family = family_for_hf_config(hf_config)
    if isinstance(family, VisionLanguageFamily):  # a multimodal model: conversion/vlm.py
        return convert_vlm_hf_to_mcore(
            hf_dir, out, family, tp=tp, pp=pp, dtype=dtype, ckpt_format=ckpt_format,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by, progress=progress,
            unsupported={"--vpp": vpp, "--ep": ep if ep > 1 else None, "--etp": etp,
                         "--decoder-first-pipeline-num-layers": decoder_first_pipeline_num_layers,
                         "--decoder-last-pipeline-num-layers": decoder_last_pipeline_num_layers,
                         "--extra-vocab-size": extra_vocab_size or None})
    model = family.hf_to_megatron(hf_config)
    uneven = (decoder_first_pipeline_num_layers is not None
              or decoder_last_pipeline_num_layers is not None)
    check_parallel_layout(model, ParallelLayout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, sp=None,
                                                uneven=uneven), ckpt_format)
    reader = HFCheckpoint(hf_dir)
    layout_values = _layout_values(tp, pp, vpp, decoder_first_pipeline_num_layers,
                                   decoder_last_pipeline_num_layers, ep, etp)
    with atomic_directory(out) as scratch, single_process_group(scratch):
        args = parse_megatron_args([
            "--hf-config-path", str(hf_dir), "--micro-batch-size", "1",
            "--seq-length", str(model["max_position_embeddings"]),
            "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by)])
        config = transformer_config_from_args(args)
        chunks = pipeline_chunks(config, pp, vpp, decoder_first_pipeline_num_layers,
                                 decoder_last_pipeline_num_layers)
        embedding = hf_embedding_name(family, config)
        if embedding not in reader.names:  # it sizes the vocabulary: needed before the layout
            raise ConversionError(f"{hf_dir}: missing {embedding!r}")
        vocab = size_vocabulary(hf_dir, reader.shape(embedding)[0], extra_vocab_size,
                                make_vocab_size_divisible_by, tp)
        args.padded_vocab_size = vocab.padded_vocab_size
        hf_dtype = reader.dtype(embedding)
        out_dtype = parse_dtype(dtype) if dtype else hf_dtype
        layout = build_layout(args, family, out_dtype)
        weights = layout.weight_map(hf_vocab_rows=vocab.hf_vocab_rows)
        check_hf_names(weights.all_hf_names(), unconverted_removed(family, hf_config, reader),
                       str(hf_dir))

        def source(name: str) -> torch.Tensor:
            hf = {hf_name: reader.get(hf_name) for hf_name in weights.hf_names(name)}
            return weights.to_megatron(name, hf).to(out_dtype)

        release = scratch / "release"
        release.mkdir()
        common = {"args": stored_args(args, layout_values, out_dtype), "checkpoint_version": 3.0,
                  "iteration": 0}
        if ckpt_format == "torch_dist":
            save_torch_dist(layout, release, source, common, progress)
        else:
            save_legacy(layout, release, source, common, chunks, tp, progress, ep)
        (scratch / TRACKER_FILE).write_text("release")
        shutil.copy2(hf_dir / "config.json", scratch / "config.json")
        copy_model_files(hf_dir, scratch)
        write_checkpoint_metadata(scratch, {
            "format_version": 1,
            "family": family.name,
            "checkpoint_format": ckpt_format,
            # Architecture defaults for `--load`; a legacy checkpoint also fixes its layout.
            "megatron_args": {**model, **(layout_values if ckpt_format == "legacy" else {})},
            "layout": {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep, "etp": etp,
                       "decoder_first_pipeline_num_layers": decoder_first_pipeline_num_layers,
                       "decoder_last_pipeline_num_layers": decoder_last_pipeline_num_layers},
            "hf_config": hf_config,
            **dataclasses.asdict(vocab),
            "dtype": dtype_name(out_dtype),
            "hf_dtype": dtype_name(hf_dtype),
        })
    return Path(out)
