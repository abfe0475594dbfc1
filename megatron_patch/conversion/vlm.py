"""Conversion of vision-language families (:class:`VisionLanguageFamily`).

The text machinery with a multimodal model in place of ``GPTModel``: the layout model is the
family's Megatron model (vision tower, projector, language model) on the meta device; the
family's rules are resolved against it by the same :class:`WeightMap`; the checkpoint is a
``torch_dist`` one written by the same streaming writer (it loads at any TP/PP, the vision
tower on the first pipeline stage). HF tensors the model never reads (the vision layers after
the feature layer) are kept in ``hf_unused.safetensors`` beside the checkpoint and written back
on export, so HF -> Megatron -> HF is bit-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron_patch.conversion.engine import ConversionError, Vocab, WeightMap, check_hf_names
from megatron_patch.conversion.hf_io import (
    HFCheckpoint,
    ShardedSafetensorsWriter,
    dtype_name,
    parse_dtype,
    parse_size,
)
from megatron_patch.conversion.layout import (
    check_parallel_layout,
    parse_megatron_args,
    single_process_group,
    single_stage_args,
)
from megatron_patch.conversion.mcore_io import (
    checkpoint_directory,
    open_checkpoint,
    size_vocabulary,
    stored_args,
)
from megatron_patch.conversion.torch_dist import TorchDistCheckpoint, save_torch_dist
from megatron_patch.mapping.config import HFConfig
from megatron_patch.models.builder import transformer_config_from_args
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.common.vision import VisionLanguageFamily
from megatron_patch.models.registry import family_for_hf_config, get_family
from megatron_patch.parallel_layout import ParallelLayout
from megatron_patch.utils.files import atomic_directory, copy_model_files
from megatron_patch.utils.metadata import TRACKER_FILE, write_checkpoint_metadata

UNUSED_FILE = "hf_unused.safetensors"
EMBEDDING = "language_model.embedding.word_embeddings.weight"
_LAYER = re.compile(r"^(\w+)\.decoder\.layers\.(\d+)\.")


def vlm_family(metadata: dict | None, hf_config: HFConfig | None
               ) -> VisionLanguageFamily | None:
    """The vision-language family named by conversion metadata or an HF config, else None."""
    try:
        family = get_family(metadata["family"]) if metadata else \
            family_for_hf_config(hf_config) if hf_config else None
    except ValueError:  # not a registered family: the text path reports it
        return None
    return family if isinstance(family, VisionLanguageFamily) else None


@dataclasses.dataclass
class VLMLayout:
    """A vision-language model (TP=1, PP=1, meta device); duck-types ``MegatronLayout`` for the
    ``torch_dist`` reader and writer."""

    family: VisionLanguageFamily
    args: Any
    config: Any
    model: torch.nn.Module
    hf_config: HFConfig

    @functools.cached_property
    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameter name -> meta parameter."""
        return dict(self.model.named_parameters())

    def groups(self) -> list[list[str]]:
        """Parameter names in streaming order: one group per layer of each tower, then the rest."""
        groups: dict[tuple[str, int], list[str]] = {}
        for name in self.parameters:
            match = _LAYER.match(name)
            key = (match.group(1), int(match.group(2))) if match else ("~", 0)
            groups.setdefault(key, []).append(name)
        return [groups[key] for key in sorted(groups)]

    def weight_map(self, hf_names: list[str], hf_rows: int) -> WeightMap:
        """The family's rules for a checkpoint with HF tensors ``hf_names``."""
        tied = not self.args.untie_embeddings_and_output_weights
        padded = self.args.padded_vocab_size
        rules = self.family.weight_rules(self.hf_config, self.config, tied, hf_names, hf_rows,
                                         padded)
        shapes = {name: p.shape for name, p in self.parameters.items()}
        return WeightMap(rules, shapes, self.config, Vocab(hf_rows=hf_rows, padded=padded))


class _MetaStaysMeta(torch.overrides.TorchFunctionMode):
    """``Tensor.cuda()`` of a meta tensor returns it (Megatron-Core's CLIP tower moves a
    position-id buffer to the GPU while it is built; the layout model has no device)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda and args and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def build_vlm_layout(args: Any, family: VisionLanguageFamily, hf_config: HFConfig,
                     dtype: torch.dtype) -> VLMLayout:
    """The layout model (needs an initialised TP=1, PP=1 state)."""
    config = dataclasses.replace(transformer_config_from_args(args), params_dtype=dtype,
                                 perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"), _MetaStaysMeta():
        model = family.build(hf_config, args, config, True, True, True,
                             transformer_engine=False)
    return VLMLayout(family, args, config, model, hf_config)


def _embedding_rows(family: VisionLanguageFamily, hf_config: HFConfig, config: Any,
                    names: list[str], reader: HFCheckpoint) -> int:
    rules = family.weight_rules(hf_config, config, True, names, 0, 0)
    hf = next(r for r in rules if r.megatron == EMBEDDING).hf_names(None)[0]
    if hf not in reader.names:
        raise ConversionError(f"{reader.hf_dir}: missing {hf!r}")
    return reader.shape(hf)[0]


def convert_vlm_hf_to_mcore(hf_dir: str | Path, out: str | Path, family: VisionLanguageFamily, *,
                            tp: int = 1, pp: int = 1, dtype: str | torch.dtype | None = None,
                            make_vocab_size_divisible_by: int = 128,
                            ckpt_format: str = "torch_dist", progress: bool = True,
                            unsupported: dict[str, Any] | None = None) -> Path:
    """HF vision-language model -> Megatron ``torch_dist`` release checkpoint at ``out``.

    ``unsupported``: options of the text conversion given values (flag -> value), refused."""
    given = {flag: value for flag, value in (unsupported or {}).items() if value is not None}
    if given:
        raise ConversionError(f"{', '.join(given)}: not supported for vision-language models "
                              "(a torch_dist checkpoint loads at any TP/PP)")
    if ckpt_format != "torch_dist":
        raise ConversionError(f"--format {ckpt_format}: vision-language models are written as "
                              "torch_dist only (it loads at any TP/PP)")
    hf_dir = Path(hf_dir)
    hf_config = load_hf_config(hf_dir)
    model_args = family.hf_to_megatron(hf_config)
    check_parallel_layout(model_args, ParallelLayout(tp=tp, pp=pp, sp=None))
    reader = HFCheckpoint(hf_dir)
    layout_values = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    with atomic_directory(out) as scratch, single_process_group(scratch):
        args = parse_megatron_args([
            "--hf-config-path", str(hf_dir), "--micro-batch-size", "1",
            "--seq-length", str(model_args["max_position_embeddings"]),
            "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by)])
        config = transformer_config_from_args(args)
        rows = _embedding_rows(family, hf_config, config, reader.names, reader)
        vocab = size_vocabulary(hf_dir, rows, 0, make_vocab_size_divisible_by, tp)
        args.padded_vocab_size = vocab.padded_vocab_size
        hf_dtype = reader.dtype(next(n for n in reader.names if n.endswith("embed_tokens.weight")))
        out_dtype = parse_dtype(dtype) if dtype else hf_dtype
        layout = build_vlm_layout(args, family, hf_config, out_dtype)
        weights = layout.weight_map(reader.names, vocab.hf_vocab_rows)
        unused = family.unused_tensors(hf_config, reader.names)
        check_hf_names(weights.all_hf_names(), sorted(set(reader.names) - set(unused)),
                       str(hf_dir))

        def source(name: str) -> torch.Tensor:
            hf = {n: reader.get(n) for n in weights.hf_names(name)}
            return weights.to_megatron(name, hf).to(out_dtype)

        release = scratch / "release"
        release.mkdir()
        common = {"args": stored_args(args, layout_values, out_dtype),
                  "checkpoint_version": 3.0, "iteration": 0}
        save_torch_dist(layout, release, source, common, progress)
        if unused:
            save_file({n: reader.get(n).contiguous() for n in unused}, scratch / UNUSED_FILE)
        (scratch / TRACKER_FILE).write_text("release")
        shutil.copy2(hf_dir / "config.json", scratch / "config.json")
        copy_model_files(hf_dir, scratch)
        write_checkpoint_metadata(scratch, {
            "format_version": 1, "family": family.name, "checkpoint_format": "torch_dist",
            "megatron_args": model_args, "layout": {"tp": tp, "pp": pp},
            "hf_config": hf_config, "hf_tensor_names": reader.names,
            **dataclasses.asdict(vocab), "dtype": dtype_name(out_dtype),
            "hf_dtype": dtype_name(hf_dtype),
        })
    return Path(out)


def convert_vlm_mcore_to_hf(mcore_dir: str | Path, out: str | Path, family: VisionLanguageFamily,
                            metadata: dict, *, hf_template: str | Path | None = None,
                            dtype: str | None = None, max_shard_size: int | str = "5GB",
                            progress: bool = True) -> Path:
    """Megatron checkpoint of a vision-language model -> HF model directory at ``out``.

    ``config.json`` comes from ``hf_template`` or the conversion metadata (one of them is
    needed); the never-read HF tensors from ``hf_unused.safetensors`` or the template's
    weights.
    """
    mcore_dir = Path(mcore_dir)
    template = Path(hf_template) if hf_template else None
    hf_config = load_hf_config(template) if template else metadata.get("hf_config")
    if hf_config is None:
        raise ConversionError(f"{mcore_dir}: no conversion metadata; pass the original model "
                              "directory as --hf-template")
    names = list(metadata.get("hf_tensor_names") or [])
    unused_source = mcore_dir / UNUSED_FILE
    if template is not None:
        names = names or HFCheckpoint(template).names
        unused_source = unused_source if unused_source.is_file() else None
    directory = checkpoint_directory(mcore_dir)
    with atomic_directory(out) as scratch, single_process_group(scratch):
        checkpoint = open_checkpoint(directory)
        if not isinstance(checkpoint, TorchDistCheckpoint):
            raise ConversionError(f"{directory}: vision-language checkpoints are torch_dist")
        args = single_stage_args(checkpoint.args, family)
        stored = checkpoint.tensors[EMBEDDING].dtype
        layout = build_vlm_layout(args, family, hf_config, stored)
        rows = int(metadata.get("vocab_rows")
                   or (hf_config.get("text_config") or hf_config)["vocab_size"])
        weights = layout.weight_map(names, rows)
        out_dtype = parse_dtype(dtype or metadata.get("hf_dtype") or stored)
        checkpoint.check(layout)
        writer = ShardedSafetensorsWriter(scratch, parse_size(max_shard_size))
        for group in layout.groups():
            tensors = checkpoint.load(group)
            for name in group:
                for hf_name, tensor in weights.to_hf(name, tensors.pop(name)).items():
                    writer.add(hf_name, tensor.to(out_dtype))
        unused = family.unused_tensors(hf_config, names)
        if unused:
            extra = _unused_tensors(unused_source, template, unused)
            for hf_name in unused:
                writer.add(hf_name, extra[hf_name].to(out_dtype))
        writer.finish()
        config = {**hf_config, "dtype": dtype_name(out_dtype)}
        (scratch / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_model_files(template or mcore_dir, scratch)
    return Path(out)


def _unused_tensors(saved: Path | None, template: Path | None,
                    names: list[str]) -> dict[str, torch.Tensor]:
    if saved is not None and saved.is_file():
        return load_file(saved)
    if template is not None:
        reader = HFCheckpoint(template)
        return {n: reader.get(n) for n in names}
    raise ConversionError(f"{len(names)} HF tensors the model does not use (e.g. {names[0]!r}) "
                          f"are neither in {UNUSED_FILE} nor given by --hf-template")
