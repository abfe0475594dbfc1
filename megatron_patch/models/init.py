"""Layout-invariant weight initialisation.

Megatron's own initialisation depends on the parallel layout (pipeline stages draw from
different RNG streams), so the same ``--seed`` gives different models at TP=2 or PP=2. Here
every parameter is drawn from a generator seeded by ``(seed, global parameter name)`` at its
unsharded shape and then sharded, so any TP/PP/VPP layout starts from the same weights.
Distributions follow Megatron: normal(0, init_method_std) for weights, scaled by
1/sqrt(2 * num_layers) for the output projections of attention and MLP, ones for norm weights,
zeros for biases. Experts are named by their global index, so expert parallelism does not
change them either.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_patch.utils.sharding import is_gated_fc1, tensor_parallel_split, tp_shard

_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm)
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")
# Transformer Engine's fused norm + linear keeps the norm's parameters under these names.
_FUSED_NORM_PARAMS = ("layer_norm_weight", "layer_norm_bias")


def _strip_wrappers(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


# Local expert indices: SequentialMLP's ``local_experts.<i>.`` and grouped GEMM's ``weight<i>``.
_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)|(\.experts\..*weight)(\d+)$")


def _global_expert(name: str, offset: int) -> str:
    """``name`` with its local expert index shifted to the global one (EP rank * local)."""
    def shift(match: re.Match) -> str:
        if match.group(1):
            return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"
        return f"{match.group(4)}{int(match.group(5)) + offset}"

    return _LOCAL_EXPERT.sub(shift, name)


def global_parameter_names(chunk: torch.nn.Module, tied: bool,
                           buffers: bool = False) -> dict[str, str]:
    """Map each local parameter name of a model chunk to its layout-independent name.

    ``buffers``: persistent buffers too (the MoE router's ``expert_bias``).
    """
    layer_offsets: dict[str, int] = {}
    local_experts = 0
    for name, module in chunk.named_modules():
        if isinstance(module, TransformerLayer):
            layer_offsets[_strip_wrappers(name)] = module.layer_number - 1
        local_experts = getattr(module, "num_local_experts", local_experts)
    expert_offset = parallel_state.get_expert_model_parallel_rank() * local_experts
    tensors = dict(chunk.named_parameters())
    if buffers:
        state = chunk.state_dict(keep_vars=True)
        tensors.update((name, buffer) for name, buffer in chunk.named_buffers() if name in state)
    names = {}
    for local, param in tensors.items():
        name = _strip_wrappers(local)
        match = re.match(r"^(.*?decoder\.layers\.\d+)\.(.*)$", name)
        if match and match.group(1) in layer_offsets:
            prefix = re.sub(r"\d+$", str(layer_offsets[match.group(1)]), match.group(1))
            name = f"{prefix}.{match.group(2)}"
        if not getattr(param, "allreduce", True):  # an expert of this expert-parallel rank
            name = _global_expert(name, expert_offset)
        if tied and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        names[local] = name
    return names


def is_norm_parameter(module: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` (a parameter of ``module``) is a norm's weight or bias.

    Torch norms, and any backend's norm module (Transformer Engine's ``RMSNorm``/``LayerNorm``,
    apex's ``FusedLayerNorm``, ...) by its class name, and the norm parameters Transformer Engine
    fuses into a linear (``layer_norm_weight``).
    """
    return (isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")
            or name.rsplit(".", 1)[-1] in _FUSED_NORM_PARAMS)


def initial_value(param: torch.nn.Parameter, module: torch.nn.Module, name: str, seed: int,
                  config: TransformerConfig) -> torch.Tensor:
    """This rank's share of the layout-invariant initial value of ``param`` (global ``name``)."""
    from megatron_patch.models.common.lora import init_adapter_tensor, is_adapter_name

    if is_norm_parameter(module, name) or name.endswith("bias"):
        if name.endswith("bias") or getattr(config, "layernorm_zero_centered_gamma", False):
            return torch.zeros_like(param)
        return torch.ones_like(param)
    tp_rank, tp_size = tensor_parallel_split(param)  # experts split over expert TP
    partitioned = getattr(param, "tensor_model_parallel", False) and tp_size > 1
    dim = getattr(param, "partition_dim", 0)
    shape = list(param.shape)
    if partitioned:
        shape[dim] *= tp_size
    if is_adapter_name(name):
        full = init_adapter_tensor(name, shape, seed, param.device)
        return tp_shard(full, dim, tp_rank, tp_size,
                        gated=is_gated_fc1(name, config.gated_linear_unit)) if partitioned else full
    std = config.init_method_std
    if name.endswith(_OUTPUT_PROJECTIONS):
        std = std / math.sqrt(2.0 * config.num_layers)
    # Drawn on the parameter's device: a GPU fills billions of parameters in seconds. The
    # stream is per device type, so layouts agree with each other on the same kind of device.
    generator = torch.Generator(device=param.device)
    generator.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    full = torch.empty(shape, dtype=torch.float32, device=param.device)
    full.normal_(0.0, std, generator=generator)
    if partitioned:
        full = tp_shard(full, dim, tp_rank, tp_size,
                        gated=is_gated_fc1(name, config.gated_linear_unit))
    return full


@torch.no_grad()
def init_layout_invariant(
    model_chunks: list[torch.nn.Module], config: TransformerConfig, seed: int, tied: bool
) -> None:
    """Overwrite all parameters of ``model_chunks`` with the layout-invariant initialisation."""
    for chunk in model_chunks:
        names = global_parameter_names(chunk, tied)
        modules = dict(chunk.named_modules())
        for local, param in chunk.named_parameters():
            owner = modules[local.rsplit(".", 1)[0]] if "." in local else chunk
            param.copy_(initial_value(param, owner, names[local], seed, config).to(param.dtype))
