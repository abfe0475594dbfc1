"""Training configurations that cannot work, reported with the flags to change, before any work.

Megatron-LM's ``validate_args`` catches many of these with bare ``assert`` statements (no
message) or only once the model is being built; :func:`check_training_config` runs on the parsed
flags first and raises :class:`ConfigError` naming the flags and their values.
"""

from __future__ import annotations

import argparse

from megatron_patch.models.common.head_split import model_kv_split_problem


class ConfigError(ValueError):
    """A combination of training flags that cannot run; the message names the flags."""


def _divides(divisor: int, value: int | None) -> bool:
    return value is None or value % divisor == 0


def _parallel_problems(args: argparse.Namespace) -> list[str]:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    model_parallel = tp * pp * cp
    problems = []
    if args.world_size % model_parallel:
        problems.append(f"{args.world_size} processes are not divisible by --tensor-model-"
                        f"parallel-size {tp} x --pipeline-model-parallel-size {pp} x "
                        f"--context-parallel-size {cp} = {model_parallel}")
    if cp > 1 and args.seq_length % (2 * cp):
        problems.append(f"--context-parallel-size {cp} splits each sequence into {2 * cp} "
                        f"chunks: --seq-length {args.seq_length} must be a multiple of {2 * cp}")
    heads = args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else heads
    for flag, value in (("--num-attention-heads", heads),
                        ("--ffn-hidden-size", args.ffn_hidden_size)):
        if not _divides(tp, value):
            problems.append(f"--tensor-model-parallel-size {tp} must divide {flag} {value}")
    kv_problem = model_kv_split_problem(vars(args), tp)
    if kv_problem:
        problems.append(f"--tensor-model-parallel-size {tp} with --num-query-groups {groups}: "
                        f"{kv_problem}")
    if groups and heads and heads % groups:
        problems.append(f"--num-query-groups {groups} must divide --num-attention-heads {heads}")
    if args.kv_channels is None and heads and args.hidden_size % heads:
        problems.append(f"--num-attention-heads {heads} must divide --hidden-size "
                        f"{args.hidden_size} (or give --kv-channels)")
    uneven = (args.decoder_first_pipeline_num_layers is not None
              or args.decoder_last_pipeline_num_layers is not None
              or getattr(args, "pipeline_model_parallel_layout", None))
    if not uneven and args.num_layers and args.num_layers % pp:
        problems.append(f"--pipeline-model-parallel-size {pp} must divide --num-layers "
                        f"{args.num_layers} (or give --decoder-first/last-pipeline-num-layers)")
    vpp = args.num_virtual_stages_per_pipeline_rank
    if vpp and pp == 1:
        problems.append("a virtual pipeline (--num-virtual-stages-per-pipeline-rank) needs "
                        "--pipeline-model-parallel-size > 1")
    elif vpp and not uneven and args.num_layers and args.num_layers % (pp * vpp):
        problems.append(f"--num-layers {args.num_layers} must be a multiple of "
                        f"--pipeline-model-parallel-size {pp} x {vpp} virtual stages")
    if args.world_size % model_parallel == 0 and args.global_batch_size:
        dp = args.world_size // model_parallel
        if args.global_batch_size % (args.micro_batch_size * dp):
            problems.append(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                            f"--micro-batch-size {args.micro_batch_size} x {dp} data-parallel "
                            "ranks")
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
    problems = _parallel_problems(args) + _loop_problems(args)
    if problems:
        raise ConfigError("invalid training configuration:\n  " + "\n  ".join(problems))
