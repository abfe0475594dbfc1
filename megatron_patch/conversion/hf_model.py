"""Megatron models built straight from an HF model directory, on the current parallel state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_patch.conversion.engine import Vocab, WeightMap, check_hf_names, rule_hf_names
from megatron_patch.conversion.hf_io import HFCheckpoint
from megatron_patch.conversion.layout import hf_embedding_name, parse_megatron_args
from megatron_patch.conversion.sharding import is_gated_fc1, tp_shard
from megatron_patch.models.builder import (
    build_gpt_model,
    family_from_args,
    transformer_config_from_args,
)
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.init import global_parameter_names
from megatron_patch.models.vocab import padded_vocab_size


def _global_shape(param: torch.nn.Parameter, tp: int) -> torch.Size:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return torch.Size(shape)


def build_model_from_hf_config(
    hf_dir: str | Path,
    *,
    load_weights: bool = True,
    params_dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
) -> GPTModel:
    """This rank's Megatron ``GPTModel`` for the HF model in ``hf_dir``.

    Megatron's parallel state must be initialised (any TP and PP; no virtual stages). With
    ``load_weights`` the parameters come from the HF safetensors - only this stage's layers,
    sliced for this tensor-parallel rank - after a strict check of the HF tensor names;
    otherwise they keep Megatron's random initialisation.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    hf_config = load_hf_config(hf_dir)
    args = parse_megatron_args([
        "--hf-config-path", str(hf_dir), "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", "1",
        "--seq-length", str(hf_config.get("max_position_embeddings", 4096))])
    config = dataclasses.replace(transformer_config_from_args(args), params_dtype=params_dtype)
    family = family_from_args(args)
    reader = HFCheckpoint(hf_dir)
    rows = reader.shape(hf_embedding_name(family, config))[0]
    args.padded_vocab_size = padded_vocab_size(rows, make_vocab_size_divisible_by, tp)
    model = build_gpt_model(args, config, parallel_state.is_pipeline_first_stage(),
                            parallel_state.is_pipeline_last_stage())
    if not load_weights:
        return model
    tied = not args.untie_embeddings_and_output_weights
    rules = family.weight_mappings(config, tied)
    check_hf_names(rule_hf_names(rules, config.num_layers), reader.names, str(hf_dir))
    names = global_parameter_names(model, tied)
    params = dict(model.named_parameters())
    weights = WeightMap(rules, {names[n]: _global_shape(p, tp) for n, p in params.items()},
                        config, Vocab(hf_rows=rows, padded=args.padded_vocab_size))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for local, param in params.items():
            name = names[local]
            full = weights.to_megatron(name, {n: reader.get(n) for n in weights.hf_names(name)})
            if getattr(param, "tensor_model_parallel", False):
                gated = is_gated_fc1(name, config.gated_linear_unit)
                full = tp_shard(full, param.partition_dim, tp_rank, tp, gated)
            param.copy_(full)
    return model
