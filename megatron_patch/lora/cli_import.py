"""``megatron-patch import-lora``: a PEFT adapter -> a LoRA checkpoint of a Megatron base.

    megatron-patch import-lora --adapter-dir ADAPTER_DIR --mcore-dir BASE --out CKPT

``CKPT`` holds the adapters only and records ``BASE`` and the adapter's LoRA settings:
fine-tuning continues with ``--load CKPT`` at any TP/PP (``BASE``'s layout does not bind it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-patch import-lora",
                                     description="Write a Hugging Face PEFT LoRA adapter as an "
                                                 "adapters-only Megatron checkpoint.")
    parser.add_argument("--adapter-dir", required=True, help="PEFT adapter directory")
    parser.add_argument("--mcore-dir", required=True,
                        help="Megatron checkpoint of the adapter's base model (hf-to-mcore)")
    parser.add_argument("--out", required=True, help="new output directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch import-lora ...``; 0 on success, 1 with one error line."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from megatron_patch.conversion.lora_peft import import_lora

    try:
        out = import_lora(args.adapter_dir, args.mcore_dir, args.out)
    except (ValueError, OSError) as exc:
        print(f"megatron-patch import-lora: error: {exc}", file=sys.stderr)
        return 1
    print(f"LoRA checkpoint written to {out} (base: {args.mcore_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
