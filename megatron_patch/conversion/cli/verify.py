"""``megatron-patch verify``: compare HF and Megatron logits for the same weights.

    megatron-patch verify --hf-dir H --mcore-dir M [--tp N] [--pp N] [--ep N] [--etp N]
        [--tolerance 1e-4] [--batch-size 2] [--seq-length 64] [--adapter-dir A]

With ``--adapter-dir`` (a PEFT LoRA adapter) ``--mcore-dir`` is a LoRA checkpoint: HF + PEFT
is compared with its base + adapter.

Prints the max abs logits difference; exits 1 above the tolerance. When the layout needs more
than one process (TP x PP, or EP x ETP x PP for mixture-of-experts models) it relaunches itself
under torchrun with that many (gloo on the CPU, nccl on GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_patch.conversion.cli.fidelity import (
    add_fidelity_flags,
    check_fidelity_flags,
    compares_in_fp32,
    run_fidelity,
)
from megatron_patch.runtime.exact_fp32 import restart_with_exact_fp32
from megatron_patch.utils.torchrun import rank_exit_status, run_distributed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-patch verify",
                                     description="Run an HF model and its Megatron checkpoint "
                                                 "on the same tokens; compare the logits.")
    parser.add_argument("--hf-dir", required=True, help="HF model directory")
    parser.add_argument("--mcore-dir", required=True,
                        help="Megatron checkpoint directory (with --adapter-dir: the LoRA "
                             "checkpoint, whose recorded base is loaded with it)")
    parser.add_argument("--adapter-dir", default=None,
                        help="PEFT LoRA adapter directory: compare HF + PEFT with the Megatron "
                             "base + adapter of the LoRA checkpoint --mcore-dir")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size to run at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size to run at")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert parallel size to run at (mixture-of-experts models)")
    parser.add_argument("--etp", type=int, default=None,
                        help="expert tensor parallel size (default: --tp)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted max abs logits difference")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64)
    add_fidelity_flags(parser)
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse missing or unusable inputs (before the relaunch, and again on each rank)."""
    from megatron_patch.conversion.mcore_to_hf import checkpoint_directory
    from megatron_patch.models.common.hf_config import load_hf_config

    load_hf_config(args.hf_dir)
    checkpoint_directory(Path(args.mcore_dir))
    check_fidelity_flags(args)
    if args.adapter_dir:
        from megatron_patch.conversion.lora_peft import read_peft_adapter

        if args.layers or args.train_steps:
            raise ValueError("--adapter-dir compares logits; it takes neither --layers nor "
                             "--train-steps")
        read_peft_adapter(args.adapter_dir)  # files present, plain LoRA


def _verify(args: argparse.Namespace) -> int:
    """The comparison on this rank; 0 within the tolerance, else 1."""
    import torch

    from megatron_patch.conversion.verify.logits import compare_logits

    mode = run_fidelity(args)  # --layers / --train-steps
    if mode is not None:
        return mode
    layout = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp,
              "batch_size": args.batch_size, "seq_length": args.seq_length}
    if args.adapter_dir:  # HF + PEFT against our base + adapter
        from megatron_patch.conversion.verify.lora import compare_lora_logits

        diff = compare_lora_logits(args.hf_dir, args.adapter_dir, args.mcore_dir, **layout)
    else:
        diff = compare_logits(args.hf_dir, args.mcore_dir, **layout)
    torch.distributed.destroy_process_group()
    ok = diff <= args.tolerance
    if int(os.environ.get("RANK", "0")) == 0:
        experts = f", ep={args.ep}, etp={args.etp or args.tp}" if args.ep > 1 or args.etp else ""
        print(f"max abs logits diff: {diff:.3e} (tolerance {args.tolerance:g}, tp={args.tp}, "
              f"pp={args.pp}{experts}): {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch verify ...``; returns 0 within the tolerance, else 1.

    Refusals (missing files, unsupported models or flags) are one error line on rank 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if compares_in_fp32(args):
        restart_with_exact_fp32("verify", argv)
    from megatron_patch.conversion.verify.logits import world_size

    try:
        _check_inputs(args)
        status = run_distributed(__name__, argv, world_size(args.tp, args.pp, args.ep,
                                                            args.etp))
        if status is not None:
            return status
        status = _verify(args)
    except (ValueError, OSError) as exc:  # UnsupportedConfigError, ConversionError, files
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron-patch verify: error: {exc}", file=sys.stderr, flush=True)
        status = 1
    return rank_exit_status(status)


if __name__ == "__main__":
    sys.exit(main())
