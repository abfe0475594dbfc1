"""``megatron-patch export-lora``: a LoRA checkpoint -> a PEFT adapter (or a merged HF model).

    megatron-patch export-lora --load CKPT --out ADAPTER_DIR [--hf-template BASE_HF_DIR]
    megatron-patch export-lora --load CKPT --out HF_DIR --merge [--hf-template BASE_HF_DIR]

``ADAPTER_DIR`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` for
``peft.PeftModel.from_pretrained(hf_base, ADAPTER_DIR)``; ``--merge`` writes the base (the
checkpoint the LoRA run recorded) with ``alpha / r * B A`` added to each adapted weight.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-patch export-lora",
                                     description="Write a LoRA checkpoint's adapters as a "
                                                 "Hugging Face PEFT adapter directory.")
    parser.add_argument("--load", required=True,
                        help="LoRA checkpoint directory (the --save of a --lora-rank run)")
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--hf-template", default=None,
                        help="the base HF model directory (named in adapter_config.json; "
                             "config and tokenizer of a --merge)")
    parser.add_argument("--merge", action="store_true",
                        help="write the merged full HF model instead of the adapter")
    parser.add_argument("--dtype", default=None,
                        help="--merge: dtype of the weights (default: the base's HF dtype)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch export-lora ...``; 0 on success, 1 with one error line."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.merge:
            from megatron_patch.conversion.lora_merge import merge_lora

            out = merge_lora(args.load, args.out, args.hf_template, args.dtype)
            print(f"merged HF model written to {out}")
        else:
            from megatron_patch.conversion.lora_peft import export_lora

            out = export_lora(args.load, args.out, args.hf_template)
            print(f"PEFT adapter written to {out}")
    except (ValueError, OSError) as exc:
        print(f"megatron-patch export-lora: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
