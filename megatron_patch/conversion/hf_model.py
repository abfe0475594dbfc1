"""Megatron models built straight from an HF model directory, on the current parallel state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_patch.conversion.engine import Vocab, WeightMap, check_hf_names
from megatron_patch.conversion.hf_io import HFCheckpoint
from megatron_patch.conversion.hf_to_mcore import unconverted_removed
from megatron_patch.conversion.layout import hf_embedding_name, parse_megatron_args
from megatron_patch.models.builder import (
    build_gpt_model,
    family_from_args,
    transformer_config_from_args,
)
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.init import global_parameter_names
from megatron_patch.models.vocab import padded_vocab_size
from megatron_patch.utils.sharding import is_gated_fc1, tensor_parallel_split, tp_shard


def _global_shape(tensor: torch.Tensor) -> torch.Size:
    shape = list(tensor.shape)
    if getattr(tensor, "tensor_model_parallel", False):
        shape[tensor.partition_dim] *= tensor_parallel_split(tensor)[1]
    return torch.Size(shape)


def _all_ranks(shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """The union of every rank's ``shapes``: the whole model, whatever its TP/PP/EP layout."""
    gathered: list[dict[str, torch.Size] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, shapes)
    return {name: shape for part in gathered for name, shape in part.items()}


def build_model_from_hf_config(
    hf_dir: str | Path,
    *,
    load_weights: bool = True,
    params_dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
) -> GPTModel:
    """This rank's Megatron ``GPTModel`` for the HF model in ``hf_dir``.

    Megatron's parallel state must be initialised (any TP, PP, EP and ETP; no virtual
    stages); call it on every rank. With ``load_weights`` the parameters come from the HF
    safetensors - only this stage's layers and this expert rank's experts, sliced for this
    (expert) tensor-parallel rank - after a strict check of the HF tensor names; otherwise they
    keep Megatron's random initialisation.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    hf_config = load_hf_config(hf_dir)
    args = parse_megatron_args([
        "--hf-config-path", str(hf_dir), "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp),
        "--expert-model-parallel-size",
        str(parallel_state.get_expert_model_parallel_world_size()),
        "--expert-tensor-parallel-size",
        str(parallel_state.get_expert_tensor_parallel_world_size()),
        "--micro-batch-size", "1",
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
    names = global_parameter_names(model, tied, buffers=True)
    state = model.state_dict(keep_vars=True)
    tensors = {local: state[local] for local in names}
    weights = WeightMap(family.weight_mappings(config, tied),
                        _all_ranks({names[n]: _global_shape(t) for n, t in tensors.items()}),
                        config, Vocab(hf_rows=rows, padded=args.padded_vocab_size))
    check_hf_names(weights.all_hf_names(), unconverted_removed(family, hf_config, reader),
                   str(hf_dir))
    with torch.no_grad():
        for local, tensor in tensors.items():
            name = names[local]
            full = weights.to_megatron(name, {n: reader.get(n) for n in weights.hf_names(name)})
            if getattr(tensor, "tensor_model_parallel", False):
                rank, size = tensor_parallel_split(tensor)
                gated = is_gated_fc1(name, config.gated_linear_unit)
                full = tp_shard(full, tensor.partition_dim, rank, size, gated)
            tensor.copy_(full)
    return model
