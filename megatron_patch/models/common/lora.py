"""LoRA adapters on Megatron-Core's tensor-parallel linears, sharded the way their base is.

An adapter adds ``scaling * B(A(dropout(x)))`` to its base linear's output (``scaling = alpha /
rank``, as in Hugging Face PEFT) through a forward hook, so the base module, its parameter names
and its checkpoint keys stay Megatron's own. The base is frozen; A and B are the only trained
parameters.

- Column-parallel base (``linear_qkv``, ``linear_fc1``): A ``[parts * r, in]`` replicated, B
  ``[out / TP, r]`` sharded like the base weight's rows (a gated ``linear_fc1`` as
  ``[gate_r; up_r]``). The low-rank product is gathered as the base gathers its input: over the
  sequence with sequence parallelism, else an identity whose backward all-reduces.
- Row-parallel base (``linear_proj``, ``linear_fc2``): A ``[r, in / TP]`` sharded like the
  base's columns, B ``[out, r]`` replicated; the partial low-rank product is reduced as the
  base's output is (all-reduce, or reduce-scatter over the sequence).
- Routed experts over expert-TP ranks: sharded the same way, but the MoE token dispatcher
  gathers their input and reduces their output, so the adapter communicates only to sum the
  gradient of its replicated matrix (A of ``linear_fc1``, B of ``linear_fc2``) over the group.

A fused base (q/k/v in ``linear_qkv``, gate/up in ``linear_fc1``) whose Hugging Face model has
separate projections gets one A per projection (stacked, ``parts`` blocks of r rows) and each
row of B multiplies its projection's block only: exactly the PEFT adapter, with B stored in the
base weight's fused row layout (a routed expert's gate/up, one 3D tensor in transformers 5 that
PEFT adapts whole, has one A). Which row belongs to which projection comes from the family's
weight mapping (:mod:`megatron_patch.mapping.rules`) applied to row indices.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_patch.mapping.rules import rule_matches
from megatron_patch.utils.sharding import is_gated_fc1, tp_shard

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ADAPTER = "lora"  # the adapter's module name under its base linear
A_NAME, B_NAME = f"{ADAPTER}.A", f"{ADAPTER}.B"


class LoraError(ValueError):
    """LoRA settings that cannot apply to this model; the message names the fix."""


@dataclass(frozen=True)
class LoraSettings:
    """Rank, alpha, dropout and target modules of the adapters."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    @property
    def scaling(self) -> float:
        """PEFT's scale of the low-rank update: alpha / rank."""
        return self.alpha / self.rank


def settings_from_args(args) -> LoraSettings | None:
    """The LoRA settings of Megatron ``args`` (``--lora-rank`` ...); None without LoRA."""
    rank = getattr(args, "lora_rank", None)
    if not rank:
        return None
    targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise LoraError(f"--lora-target-modules {args.lora_target_modules!r}: use a comma "
                        f"separated subset of {','.join(TARGETS)} (unknown: {unknown})")
    if rank < 1 or not 0.0 <= args.lora_dropout < 1.0:
        raise LoraError(f"--lora-rank {rank} must be >= 1 and --lora-dropout "
                        f"{args.lora_dropout} in [0, 1)")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * rank
    return LoraSettings(rank, float(alpha), args.lora_dropout, targets)


def settings_as_args(settings: LoraSettings) -> dict[str, object]:
    """The Megatron argument values (``lora_rank`` ...) :func:`settings_from_args` reads as
    ``settings``."""
    return {"lora_rank": settings.rank, "lora_alpha": settings.alpha,
            "lora_dropout": settings.dropout, "lora_target_modules": ",".join(settings.targets)}


def check_resumed_settings(given: LoraSettings | None, saved: LoraSettings,
                           checkpoint: object) -> None:
    """Refuse ``--lora-*`` flags that differ from those the adapters-only ``checkpoint`` was
    trained with (its adapters continue: their shapes and scale are fixed)."""
    if given is None:
        raise LoraError(f"{checkpoint} holds LoRA adapters only (rank {saved.rank}), but "
                        "--lora-rank 0 turns LoRA off; drop --lora-rank to continue the adapters, "
                        "or load a checkpoint with all weights for full fine-tuning")
    ours, theirs = settings_as_args(given), settings_as_args(saved)
    ours["lora_target_modules"] = ",".join(sorted(given.targets))  # their order does not matter
    theirs["lora_target_modules"] = ",".join(sorted(saved.targets))
    differ = "; ".join(f"--{name.replace('_', '-')} {_shown(ours[name])} given, the "
                       f"checkpoint's is {_shown(theirs[name])}"
                       for name in theirs if ours[name] != theirs[name])
    if differ:
        raise LoraError(f"{checkpoint} holds LoRA adapters trained with other settings "
                        f"({differ}). Drop the --lora-* flags to continue them with the "
                        "checkpoint's settings, or train new adapters from the base "
                        "(--pretrained-checkpoint BASE) with another --save and without "
                        "this --load")


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def is_adapter_name(name: str) -> bool:
    """Whether a parameter / state-dict key is a LoRA adapter tensor."""
    return name.endswith((f".{A_NAME}", f".{B_NAME}"))


def init_adapter_tensor(name: str, shape: list[int], seed: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Unsharded initial value of adapter tensor ``name`` (a global parameter name): PEFT's
    (A kaiming-uniform with a = sqrt(5), B zero), drawn from a generator seeded by the name."""
    if name.endswith(B_NAME):
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    bound = 1.0 / math.sqrt(shape[-1])  # kaiming_uniform_(a=sqrt(5)) on a [rows, fan_in] matrix
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=generator)


class LoraAdapter(torch.nn.Module):
    """The low-rank update of one Megatron linear (see the module docstring)."""

    def __init__(self, base: ColumnParallelLinear | RowParallelLinear, settings: LoraSettings,
                 parts: torch.Tensor | None):
        super().__init__()
        self.column = isinstance(base, ColumnParallelLinear)
        self.scaling = settings.scaling
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout else None
        self.tp_group = base.tp_group
        self.sequence_parallel = base.sequence_parallel and not base.explicit_expert_comm
        self.communicate = not base.explicit_expert_comm and self.tp_group.size() > 1
        # routed experts over expert-TP ranks: the token dispatcher gathers their input and
        # reduces their output (and the input's gradient), as for the base; the replicated
        # matrix's gradient, partial on each rank, is summed over the group here
        self.sum_replicated_grad = base.explicit_expert_comm and self.tp_group.size() > 1
        weight, rank = base.weight, settings.rank
        out_rows, in_cols = weight.shape
        count = int(parts.max()) + 1 if parts is not None else 1
        kwargs = {"dtype": weight.dtype, "device": weight.device}
        self.A = torch.nn.Parameter(torch.empty(count * rank, in_cols, **kwargs))
        self.B = torch.nn.Parameter(torch.empty(out_rows, rank, **kwargs))
        sharded, replicated = (self.B, self.A) if self.column else (self.A, self.B)
        set_tensor_model_parallel_attributes(sharded, True, 0 if self.column else 1, 1)
        # replicated over TP but computed from this rank's share of the sequence: summed over TP
        replicated.sequence_parallel = self.sequence_parallel
        for param in (self.A, self.B):
            param.allreduce = getattr(weight, "allreduce", True)  # experts: expert DP
        self.rank = rank
        if parts is not None:
            order = torch.cat([torch.nonzero(parts == p).flatten() for p in range(count)])
            self.register_buffer("rows", order, persistent=False)
            self.register_buffer("restore", torch.argsort(order), persistent=False)
            self.part_sizes = [int((parts == p).sum()) for p in range(count)]
        else:
            self.rows = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B A dropout(x)`` with the base's tensor-parallel communication."""
        if self.dropout is not None:
            if self.column and not self.sequence_parallel:
                x = self.dropout(x)  # the same input on every TP rank: the same mask
            else:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    x = self.dropout(x)
        a, b = self.A, self.B
        if self.sum_replicated_grad:  # identity forward, all-reduced gradient
            if self.column:
                a = copy_to_tensor_model_parallel_region(a, group=self.tp_group)
            else:
                b = copy_to_tensor_model_parallel_region(b, group=self.tp_group)
        low = torch.nn.functional.linear(x, a)
        if self.communicate:
            if self.column:
                low = (gather_from_sequence_parallel_region(low, group=self.tp_group)
                       if self.sequence_parallel
                       else copy_to_tensor_model_parallel_region(low, group=self.tp_group))
            else:
                low = (reduce_scatter_to_sequence_parallel_region(low, group=self.tp_group)
                       if self.sequence_parallel
                       else reduce_from_tensor_model_parallel_region(low, group=self.tp_group))
        if self.rows is None:
            return torch.nn.functional.linear(low, b) * self.scaling
        blocks = low.split(self.rank, dim=-1)
        rows = b[self.rows].split(self.part_sizes)
        out = torch.cat([torch.nn.functional.linear(h, b) for h, b in zip(blocks, rows)], -1)
        return out[..., self.restore] * self.scaling


def _add_adapter_output(module, args, output):
    """Forward hook: the base's ``(output, bias)`` with the adapter's update added."""
    result, bias = output
    return result + module.lora(args[0]).to(result.dtype), bias


def _adapter_sharded_state_dict(module, original, gated: bool):
    """``sharded_state_dict`` of a base linear with its adapter sharded like the base (B of a
    gated ``linear_fc1`` as ``[gate_r; up_r]``, like the base weight)."""
    def sharded_state_dict(prefix: str = "", sharded_offsets=(), metadata=None):
        state = original(prefix, sharded_offsets, metadata)
        adapter = module.lora
        axis = {B_NAME: 0} if adapter.column else {A_NAME: 1}
        state.update(make_sharded_tensors_for_checkpoint(
            {A_NAME: adapter.A, B_NAME: adapter.B}, prefix, axis, sharded_offsets,
            tp_group=module.tp_group, dp_cp_group=metadata["dp_cp_group"]))
        if gated:
            key = f"{prefix}{B_NAME}"
            state[key] = apply_swiglu_sharded_factory(
                state[key], sharded_offsets, metadata.get("singleton_local_shards", False),
                tp_group=module.tp_group, dp_group=metadata["dp_cp_group"])
        return state

    return sharded_state_dict


def target_linears(chunk: torch.nn.Module, targets: tuple[str, ...]
                   ) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every linear of ``chunk`` named by ``targets`` (experts included)."""
    for name, module in chunk.named_modules():
        if name.rsplit(".", 1)[-1] in targets and ".decoder.layers." in f".{name}":
            yield name, module


def parts_of_rows(rule, layer, config, rows: int) -> torch.Tensor | None:
    """For a fused base weight of ``rows`` (unsharded) rows: the HF projection each row
    belongs to (0, 1, ... in the rule's HF order); None where the rule maps one HF tensor."""
    pieces = rule.to_hf(torch.arange(rows).unsqueeze(1), layer, config)
    if len(pieces) == 1:
        return None
    parts = torch.empty(rows, dtype=torch.long)
    for index, name in enumerate(rule.hf_names(layer)):
        parts[pieces[name].flatten()] = index
    return parts


def low_rank_update(a: torch.Tensor, b: torch.Tensor, parts: torch.Tensor | None,
                    settings: LoraSettings) -> torch.Tensor:
    """``alpha / r * B A`` of one adapter's unsharded A and B in the base weight's row layout
    (fp32, computed in float64; stacked experts' ``[E, ...]`` batched); with ``parts``
    (:func:`parts_of_rows`) each row of B multiplies its projection's block of A, as
    :class:`LoraAdapter` does."""
    a, b = a.double(), b.double()
    if parts is None:
        update = b @ a
    else:
        update = torch.empty(b.shape[0], a.shape[1], dtype=torch.float64)
        for part, block in enumerate(a.split(settings.rank)):
            update[parts == part] = b[parts == part] @ block
    return (settings.scaling * update).float()


def apply_lora(chunk: torch.nn.Module, settings: LoraSettings, rules, config,
               seed: int) -> int:
    """Add adapters to the targeted linears of a model chunk and freeze everything else;
    returns the number of adapted linears. ``rules`` is the family's weight mapping (TP=1
    names), which gives fused bases their per-projection layout."""
    from megatron_patch.models.init import global_parameter_names

    names = global_parameter_names(chunk, tied=False)
    for param in chunk.parameters():
        param.requires_grad = False
    adapted = 0
    for name, module in list(target_linears(chunk, settings.targets)):
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            raise LoraError(f"{name} is a {type(module).__name__}: LoRA adapts Megatron-Core's "
                            "torch-native linears; run without Transformer Engine layers "
                            "(--transformer-impl local)")
        weight_name = names[f"{name}.weight"]
        found = rule_matches(rules, weight_name)
        if len(found) != 1:
            raise LoraError(f"Megatron parameter {weight_name!r} matches {len(found)} "
                            "weight-mapping rules (expected exactly one)")
        (rule, layer), = found
        column = isinstance(module, ColumnParallelLinear)
        tp_rank, tp_size = module.tp_group.rank(), module.tp_group.size()
        rows = module.weight.shape[0] * (tp_size if column else 1)
        # a routed expert's gate/up is one HF tensor (transformers 5's experts.gate_up_proj,
        # which PEFT adapts whole through target_parameters): one A, like PEFT's
        parts = (parts_of_rows(rule, layer, config, rows)
                 if column and not module.is_expert else None)
        gated = column and is_gated_fc1(f".{name}.", config.gated_linear_unit)
        if parts is not None:
            parts = tp_shard(parts, 0, tp_rank, tp_size, gated=gated)
        module.lora = LoraAdapter(module, settings, parts)
        module.register_forward_hook(_add_adapter_output)
        module.sharded_state_dict = _adapter_sharded_state_dict(
            module, module.sharded_state_dict, gated)
        adapted += 1
    if not any(param.is_meta for param in chunk.parameters()):  # layout models have no values
        _init_adapters(chunk, config, seed)
    return adapted


@torch.no_grad()
def _init_adapters(chunk: torch.nn.Module, config, seed: int) -> None:
    """Layout-invariant initial adapters (:func:`megatron_patch.models.init.initial_value`)."""
    from megatron_patch.models.init import global_parameter_names, initial_value

    names = global_parameter_names(chunk, tied=False)
    modules = dict(chunk.named_modules())
    for local, param in chunk.named_parameters():
        if is_adapter_name(local):
            owner = modules[local.rsplit(".", 1)[0]]
            param.copy_(initial_value(param, owner, names[local], seed, config).to(param.dtype))


def model_parallel_counts(model: list[torch.nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameters of this rank's chunks."""
    params = [p for chunk in model for p in chunk.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

