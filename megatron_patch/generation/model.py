"""A Megatron checkpoint ready for inference: arguments, model chunk, tokenizer, vocabulary.

``--load M`` works as in training: a converted checkpoint's ``megatron_patch.json`` gives the
architecture, tokenizer files and vocabulary; a checkpoint saved by training (no metadata) gives
its saved args, whose architecture is read back through the family's config mapping (the same
round trip ``convert mcore-to-hf`` makes). The model is built with the torch-native layer spec
(its attention takes arbitrary masks, which left-padded batches need) and loaded by
Megatron's ``load_checkpoint`` at any TP/PP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_patch.conversion.checkpoint_defaults import (
    has_tokenizer,
    saved_args,
    saved_model_defaults,
)
from megatron_patch.data.bad_records import DataError
from megatron_patch.models.common.lora import settings_from_args
from megatron_patch.utils.metadata import checkpoint_metadata
from megatron_patch.utils.torchrun import run_distributed

DTYPES = ("auto", "fp32", "bf16", "fp16")


def run_cli(prog: str, module: str, parser: argparse.ArgumentParser,
            run: Callable[[argparse.Namespace, Sequence[str]], int],
            argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, relaunch under torchrun for ``--tp * --pp`` ranks when needed, then call
    ``run(options, megatron_flags)`` on every rank; our errors become exit status 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    options, extra = parser.parse_known_args(argv)
    status = run_distributed(module, argv, options.tp * options.pp)
    if status is not None:
        return status
    try:
        return run(options, extra)
    except (DataError, ValueError, OSError) as error:
        if is_rank0():
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def is_rank0() -> bool:
    """Whether this process is global rank 0 (torchrun's ``RANK``; a lone process is)."""
    return int(os.environ.get("RANK", "0")) == 0


def _dtype_flags(dtype: str) -> list[str]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; use one of {DTYPES}")
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[dtype]


def parse_inference_args(load: str | Path, *, tp: int = 1, pp: int = 1, dtype: str = "auto",
                         seq_length: int | None = None, micro_batch_size: int = 1,
                         tokenizer_type: str | None = None, tokenizer_path: str | None = None,
                         extra: Sequence[str] = ()) -> argparse.Namespace:
    """Megatron + megatron-patch arguments for running the checkpoint at ``load``.

    ``seq_length`` defaults to the model's ``max_position_embeddings``; ``extra`` are further
    Megatron flags (command-line values win over the checkpoint's).
    """
    from megatron_patch.conversion.layout import parse_megatron_args

    load = Path(load)
    if not load.is_dir():
        raise FileNotFoundError(f"--load {load}: no such checkpoint directory")
    defaults = {} if checkpoint_metadata(load) else saved_model_defaults(load)
    if tokenizer_type is None and "patch_tokenizer_type" not in defaults and has_tokenizer(load):
        tokenizer_type = "HFTokenizer"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    argv = ["--load", str(load), "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp),
            "--micro-batch-size", str(micro_batch_size),
            "--global-batch-size", str(micro_batch_size * max(1, world // (tp * pp))),
            "--seq-length", str(seq_length or 1), "--finetune", "--no-load-optim",
            "--no-load-rng", "--attention-dropout", "0", "--hidden-dropout", "0",
            *_dtype_flags(dtype)]
    if tokenizer_type:
        argv += ["--patch-tokenizer-type", tokenizer_type]
    if tokenizer_path:
        argv += ["--patch-tokenizer-path", tokenizer_path]
    args = parse_megatron_args([*argv, *extra], defaults)
    args.seq_length = seq_length or args.max_position_embeddings
    args.sequence_parallel = False  # decode steps hold one token per sequence
    return args


@dataclass
class InferenceModel:
    """This rank's model chunk (one pipeline stage), its tokenizer and its vocabulary rows."""

    model: torch.nn.Module
    tokenizer: Any
    args: argparse.Namespace
    vocab_rows: int  # logits columns that are real tokens (the rest is padding)

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: the tokenizer's and those of ``generation_config.json``."""
        ids = {int(self.tokenizer.eod)}
        for directory in (self.args.patch_tokenizer_path, self.args.load):
            path = Path(directory or "") / "generation_config.json"
            if directory and path.is_file():
                eos = json.loads(path.read_text()).get("eos_token_id")
                ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos])
                           if i is not None)
                break
        return sorted(ids)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which checkpoint runs how: ``--load``, ``--tp``/``--pp``, dtype,
    tokenizer."""
    parser.add_argument("--load", required=True,
                        help="Megatron checkpoint directory (converted, or saved by training)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size to run at")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size to run at")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights and activations (auto: bf16 on GPUs, fp32 on the CPU)")
    parser.add_argument("--tokenizer-type", default=None,
                        help="tokenizer type (default: the checkpoint's, else HFTokenizer when "
                             "--load holds tokenizer files)")
    parser.add_argument("--tokenizer-path", default=None,
                        help="tokenizer directory or file (default: the checkpoint's, or --load)")


def args_from_options(options: argparse.Namespace, extra: Sequence[str], *,
                      seq_length: int | None = None,
                      micro_batch_size: int = 1) -> argparse.Namespace:
    """:func:`parse_inference_args` for the options of :func:`add_model_options`."""
    return parse_inference_args(options.load, tp=options.tp, pp=options.pp, dtype=options.dtype,
                                seq_length=seq_length, micro_batch_size=micro_batch_size,
                                tokenizer_type=options.tokenizer_type,
                                tokenizer_path=options.tokenizer_path, extra=extra)


def load_tokenizer(args: argparse.Namespace) -> Any:
    """The checkpoint's tokenizer (``--patch-tokenizer-type``/``-path``, else its files)."""
    from megatron_patch.training.pretrain import build_run_tokenizer

    if args.patch_tokenizer_type is None:
        raise ValueError(f"{args.load} holds no tokenizer files and names no tokenizer; pass "
                         "--tokenizer-type (and --tokenizer-path)")
    return build_run_tokenizer(args)


def load_inference_model(args: argparse.Namespace, tokenizer: Any) -> InferenceModel:
    """Initialise the parallel state, build this rank's model chunk and load ``args.load`` (an
    adapters-only LoRA checkpoint with its base)."""
    from megatron.core.enums import ModelType
    from megatron.training.training import get_model

    from megatron_patch.models.builder import gpt_model_provider
    from megatron_patch.training.checkpoint import load_megatron_checkpoint
    from megatron_patch.training.initialize import initialize
    from megatron_patch.training.lora import load_lora_model
    from megatron_patch.training.pretrain import set_padded_vocab

    if args.virtual_pipeline_model_parallel_size:
        raise ValueError("inference runs without virtual pipeline stages; drop --num-layers-per-"
                         "virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank")
    initialize(args)
    set_padded_vocab(args, tokenizer)
    metadata = checkpoint_metadata(args.load) or {}
    if not metadata:
        saved = saved_args(args.load).padded_vocab_size
        if saved % args.tensor_model_parallel_size:
            raise ValueError(f"{args.load}: its {saved} embedding rows do not split over "
                             f"--tp {args.tensor_model_parallel_size}")
        args.padded_vocab_size = saved

    if settings_from_args(args) is not None:  # adapters-only: on the base it records
        model = load_lora_model(args)
    else:
        model = get_model(gpt_model_provider(args, transformer_engine=False),
                          ModelType.encoder_or_decoder, wrap_with_ddp=False)
        load_megatron_checkpoint(model, None, None)
    model[0].eval()
    rows = metadata.get("vocab_rows") or args.vocab_size or tokenizer.vocab_size
    return InferenceModel(model[0], tokenizer, args, min(int(rows), args.padded_vocab_size))
