"""Training configurations that cannot work, reported with the flags to change, before any work.

Megatron-LM's ``validate_args`` catches many of these with bare ``assert`` statements (no
message) or only once the model is being built; :func:`check_training_config` runs on the parsed
flags first and raises :class:`ConfigError` naming the flags and their values.
"""

from __future__ import annotations

import argparse

from megatron_patch.parallel_layout import REFUSED, ParallelLayout, Wording


class ConfigError(ValueError):
    """A combination of training flags that cannot run; the message names the flags."""


# Megatron's flags for the layout's sizes and the model's fields.
MEGATRON_NAMES = {
    "tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
    "vpp": "--num-virtual-stages-per-pipeline-rank", "cp": "--context-parallel-size",
    "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size",
    "expert_tp": "--expert-tensor-parallel-size", "sp": "--sequence-parallel",
    "dp": "{} data-parallel ranks", "micro_batch": "--micro-batch-size",
    "global_batch": "--global-batch-size", "seq": "--seq-length",
    "uneven": "--decoder-first/last-pipeline-num-layers"}
MEGATRON_FIELDS = {"num_attention_heads": "--num-attention-heads {}",
                   "num_query_groups": "--num-query-groups {}", "num_layers": "--num-layers {}",
                   "ffn_hidden_size": "--ffn-hidden-size {}", "num_experts": "--num-experts {}",
                   "moe_ffn_hidden_size": "--moe-ffn-hidden-size {}"}
MEGATRON_WORDING = Wording(MEGATRON_NAMES, MEGATRON_FIELDS, model="this model",
                           fields_are_flags=True)


def args_layout(args: argparse.Namespace) -> ParallelLayout:
    """The parallel layout of Megatron's parsed (not yet validated) arguments."""
    uneven = (args.decoder_first_pipeline_num_layers is not None
              or args.decoder_last_pipeline_num_layers is not None
              or bool(getattr(args, "pipeline_model_parallel_layout", None)))
    return ParallelLayout(
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        vpp=args.num_virtual_stages_per_pipeline_rank, cp=args.context_parallel_size,
        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
        sp=args.sequence_parallel, world=args.world_size, micro_batch=args.micro_batch_size,
        global_batch=args.global_batch_size, seq=args.seq_length, uneven=uneven)


def _parallel_problems(args: argparse.Namespace) -> list[str]:
    """The layout's refusals (settings Megatron ignores, and what only a training step of a
    text model refuses, are left to Megatron: see :mod:`megatron_patch.parallel_layout`)."""
    return [problem.message(MEGATRON_WORDING)
            for problem in args_layout(args).problems(vars(args)) if problem.kind == REFUSED]


def _model_problems(args: argparse.Namespace) -> list[str]:
    """Attention shapes Megatron's ``validate_args`` asserts without a message."""
    heads = args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else heads
    problems = []
    if groups and heads and heads % groups:
        problems.append(f"--num-query-groups {groups} must divide --num-attention-heads {heads}")
    if args.kv_channels is None and heads and args.hidden_size % heads:
        problems.append(f"--num-attention-heads {heads} must divide --hidden-size "
                        f"{args.hidden_size} (or give --kv-channels)")
    return problems


def _loop_problems(args: argparse.Namespace) -> list[str]:
    """Flags megatron-patch's training loop does not implement."""
    problems = []
    if args.async_save:
        problems.append("--async-save is not supported by megatron-patch's training loop (its "
                        "checkpoints are written synchronously and crash-safe); drop the flag")
    if args.save and args.ckpt_format not in ("torch_dist", "torch"):
        problems.append(f"--ckpt-format {args.ckpt_format}: megatron-patch saves torch_dist "
                        "(default) or torch (legacy) checkpoints")
    return problems


def check_training_config(args: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` listing every impossible flag combination of ``args``.

    Runs on Megatron's parsed (not yet validated) arguments, so on every rank before anything
    heavy (process groups, model, data) starts.
    """
    problems = _parallel_problems(args) + _model_problems(args) + _loop_problems(args)
    if problems:
        raise ConfigError("invalid training configuration:\n  " + "\n  ".join(problems))
