"""Hugging Face model directory -> Megatron-Core release checkpoint."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_patch.conversion.engine import ConversionError, check_hf_names
from megatron_patch.conversion.hf_io import HFCheckpoint, dtype_name, parse_dtype
from megatron_patch.conversion.layout import (
    build_layout,
    hf_embedding_name,
    parse_megatron_args,
    pipeline_chunks,
    single_process_group,
)
from megatron_patch.conversion.legacy import save_legacy
from megatron_patch.conversion.torch_dist import save_torch_dist
from megatron_patch.mapping.config import HFConfig, MegatronArgs
from megatron_patch.models.builder import transformer_config_from_args
from megatron_patch.models.common.head_split import model_kv_split_problem
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.registry import ModelFamily, family_for_hf_config
from megatron_patch.models.vocab import needed_vocab_rows, padded_vocab_size
from megatron_patch.utils.files import atomic_directory, copy_model_files
from megatron_patch.utils.metadata import TRACKER_FILE, write_checkpoint_metadata

FORMATS = ("torch_dist", "legacy")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def tokenizer_size(hf_dir: Path) -> int | None:
    """Tokens of the HF tokenizer in ``hf_dir`` (added tokens included); None without one."""
    if not any(next(hf_dir.glob(pattern), None) for pattern in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(hf_dir))
    except (OSError, ValueError) as exc:
        warnings.warn(f"{hf_dir}: tokenizer not loadable ({exc}); sizing the vocabulary from the "
                      "embedding rows", stacklevel=2)
        return None


def _layout_values(tp: int, pp: int, vpp: int | None, first: int | None,
                   last: int | None, ep: int = 1, etp: int | None = None) -> MegatronArgs:
    values = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
              "num_virtual_stages_per_pipeline_rank": vpp,
              "decoder_first_pipeline_num_layers": first,
              "decoder_last_pipeline_num_layers": last,
              "expert_model_parallel_size": ep if ep > 1 else None,
              "expert_tensor_parallel_size": etp}
    return {key: value for key, value in values.items() if value is not None}


def _check_parallel(model: MegatronArgs, tp: int, pp: int, vpp: int | None, ep: int = 1,
                    etp: int | None = None, ckpt_format: str = "torch_dist") -> None:
    heads = model.get("num_attention_heads")
    if heads and heads % tp:
        raise ConversionError(f"--tp {tp} must divide num_attention_heads={heads} (Megatron "
                              "splits the attention heads)")
    kv_problem = model_kv_split_problem(model, tp)
    if kv_problem:
        raise ConversionError(f"--tp {tp}: {kv_problem}")
    if vpp and pp == 1:
        raise ConversionError("--vpp needs --pp > 1")
    experts = model.get("num_experts")
    if (ep > 1 or etp is not None) and not experts:
        raise ConversionError(f"--ep {ep} / --etp {etp} need a mixture-of-experts model; this "
                              "one has no routed experts")
    if experts and experts % ep:
        raise ConversionError(f"--ep {ep} must divide the {experts} routed experts "
                              "(config.json num_experts / num_local_experts / n_routed_experts)")
    expert_tp = tp if etp is None else etp
    if experts and model["moe_ffn_hidden_size"] % expert_tp:
        raise ConversionError(f"expert tensor parallel size {expert_tp} must divide the expert "
                              f"FFN size moe_ffn_hidden_size={model['moe_ffn_hidden_size']}")
    if ckpt_format == "legacy" and expert_tp != tp:
        raise ConversionError(f"--etp {etp} differs from --tp {tp}: legacy checkpoints split "
                              "experts over the tensor-parallel ranks; use --format torch_dist "
                              "(it loads at any TP/EP/ETP)")


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


@dataclass(frozen=True)
class VocabSizes:
    """How the vocabulary was sized (recorded in the metadata)."""

    hf_vocab_rows: int  # rows of the HF embedding
    tokenizer_vocab_size: int | None
    extra_vocab_size: int
    vocab_rows: int  # rows that carry tokens: max(HF rows, tokenizer + extra); kept on export
    make_vocab_size_divisible_by: int
    padded_vocab_size: int  # Megatron's embedding rows


def size_vocabulary(hf_dir: Path, hf_rows: int, extra: int, divisible_by: int,
                    tp: int) -> VocabSizes:
    """Vocabulary rows from the HF embedding, its tokenizer and ``--extra-vocab-size``."""
    tokens = tokenizer_size(hf_dir)
    rows = needed_vocab_rows(tokens or hf_rows, hf_rows, extra)
    return VocabSizes(hf_rows, tokens, extra, rows, divisible_by,
                      padded_vocab_size(rows, divisible_by, tp))


def _saved_args(args: argparse.Namespace, layout: MegatronArgs, dtype: torch.dtype
                ) -> argparse.Namespace:
    """The args stored in the checkpoint: as parsed, with the layout it was written for."""
    saved = copy.copy(args)
    vars(saved).update(layout)
    saved.virtual_pipeline_model_parallel_size = layout.get("num_virtual_stages_per_pipeline_rank")
    saved.params_dtype = dtype
    return saved


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
    if "vlm" in family.extra:  # vision-language: conversion/vlm.py
        from megatron_patch.conversion.vlm import convert_vlm_hf_to_mcore

        return convert_vlm_hf_to_mcore(
            hf_dir, out, family, tp=tp, pp=pp, dtype=dtype, ckpt_format=ckpt_format,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by, progress=progress,
            unsupported={"--vpp": vpp, "--ep": ep if ep > 1 else None, "--etp": etp,
                         "--decoder-first-pipeline-num-layers": decoder_first_pipeline_num_layers,
                         "--decoder-last-pipeline-num-layers": decoder_last_pipeline_num_layers,
                         "--extra-vocab-size": extra_vocab_size or None})
    model = family.hf_to_megatron(hf_config)
    _check_parallel(model, tp, pp, vpp, ep, etp, ckpt_format)
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
        common = {"args": _saved_args(args, layout_values, out_dtype), "checkpoint_version": 3.0,
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
