"""``megatron-patch convert``: HF <-> Megatron-Core checkpoint conversion.

    megatron-patch convert hf-to-mcore --hf-dir H --out M [--tp N] [--pp N] [--vpp N]
        [--dtype bf16|fp16|fp32] [--extra-vocab-size N] [--make-vocab-size-divisible-by N]
        [--format torch_dist|legacy] [--decoder-first-pipeline-num-layers N]
        [--decoder-last-pipeline-num-layers N] [--ep N] [--etp N]
    megatron-patch convert mcore-to-hf --mcore-dir M --out H2 [--hf-template H]
        [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_patch.conversion.hf_io import DTYPES

_DTYPES = sorted(DTYPES)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-patch convert",
                                     description="Convert checkpoints between Hugging Face and "
                                                 "Megatron-Core (lossless).")
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF model directory -> Megatron checkpoint")
    to_mcore.add_argument("--hf-dir", required=True, help="HF model directory (safetensors)")
    to_mcore.add_argument("--out", required=True, help="new Megatron checkpoint directory")
    to_mcore.add_argument("--tp", type=int, default=1,
                          help="tensor parallel size (vocabulary padding; legacy file layout)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    to_mcore.add_argument("--vpp", type=int, default=None,
                          help="virtual pipeline stages per pipeline rank")
    to_mcore.add_argument("--dtype", choices=_DTYPES, default=None,
                          help="weight dtype (default: that of the HF weights)")
    to_mcore.add_argument("--extra-vocab-size", type=int, default=0,
                          help="embedding rows beyond the tokenizer (explicit override)")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_mcore.add_argument("--format", dest="ckpt_format", choices=["torch_dist", "legacy"],
                          default="torch_dist",
                          help="torch_dist (loads at any TP/PP) or legacy mp_rank_* files")
    to_mcore.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    to_mcore.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    to_mcore.add_argument("--ep", type=int, default=1,
                          help="expert parallel size (must divide the routed experts; legacy "
                               "file layout)")
    to_mcore.add_argument("--etp", type=int, default=None,
                          help="expert tensor parallel size (default: --tp)")
    to_mcore.add_argument("--no-progress", action="store_true", help="no progress bars")
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF model directory")
    to_hf.add_argument("--mcore-dir", required=True,
                       help="Megatron checkpoint directory (converted or saved by training)")
    to_hf.add_argument("--out", required=True, help="new HF model directory")
    to_hf.add_argument("--hf-template", default=None,
                       help="HF model directory to take config.json and tokenizer files from")
    to_hf.add_argument("--dtype", choices=_DTYPES, default=None,
                       help="weight dtype (default: the original HF dtype, else as stored)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch convert ...``; returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    source = ("--hf-dir", args.hf_dir) if args.direction == "hf-to-mcore" else \
        ("--mcore-dir", args.mcore_dir)
    if not Path(source[1]).is_dir():
        print(f"megatron-patch convert: error: {source[0]} {source[1]}: no such directory",
              file=sys.stderr)
        return 1
    from megatron_patch.conversion import convert_hf_to_mcore, convert_mcore_to_hf

    try:
        if args.direction == "hf-to-mcore":
            out = convert_hf_to_mcore(
                args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=args.dtype,
                extra_vocab_size=args.extra_vocab_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                ckpt_format=args.ckpt_format,
                decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
                decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
                ep=args.ep, etp=args.etp, progress=not args.no_progress)
        else:
            out = convert_mcore_to_hf(args.mcore_dir, args.out, hf_template=args.hf_template,
                                      dtype=args.dtype, max_shard_size=args.max_shard_size,
                                      progress=not args.no_progress)
    except (ValueError, OSError) as exc:  # ConversionError, UnsupportedConfigError, files
        print(f"megatron-patch convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
