"""Command-line arguments: Megatron-LM's own parser plus the megatron-patch flags.

Every Megatron-LM flag (``--tensor-model-parallel-size``, ``--micro-batch-size``, ...) keeps its
name and meaning because the parser *is* Megatron's (``megatron.training.arguments``). Our flags
are added by :func:`add_patch_arguments`, the ``extra_args_provider`` hook, which also switches
off the fused kernels whose libraries are not installed so the defaults always run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from megatron.training.arguments import parse_args, validate_args

from megatron_patch.config_checks import check_training_config
from megatron_patch.models.common.architecture import add_architecture_arguments
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.common.lora import (
    LoraSettings,
    check_resumed_settings,
    settings_as_args,
    settings_from_args,
)
from megatron_patch.models.registry import family_for_hf_config, get_family
from megatron_patch.runtime.backends import available_backends, flash_attention_backend
from megatron_patch.runtime.cpu_compat import apply_cpu_compat
from megatron_patch.runtime.gpu_fast_paths import install_wgrad_accumulation
from megatron_patch.utils.metadata import checkpoint_metadata, saved_args

# --on-nonfinite: what training does on a NaN/inf loss or gradient (training/resilience.py)
ON_NONFINITE = ("stop", "skip")


def add_patch_arguments(
    parser: argparse.ArgumentParser, model_defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """Add the megatron-patch flags to Megatron's parser (``extra_args_provider``).

    ``model_defaults`` (architecture values from an HF config or checkpoint metadata) become
    parser defaults, so explicit command-line flags still win.
    """
    group = parser.add_argument_group("megatron-patch")
    group.add_argument("--model-family", default=None,
                       help="Registered model family (llama, qwen2, ...); default: from the "
                            "HF config given by --hf-config-path, else llama.")
    group.add_argument("--hf-config-path", default=None,
                       help="HF model directory whose config.json defines the architecture.")
    group.add_argument("--patch-tokenizer-type", default=None,
                       help="HFTokenizer, SentencePieceTokenizer, TikTokenizer, ByteTokenizer "
                            "or TinyTokenizer (the shipped demo tokenizer).")
    group.add_argument("--patch-tokenizer-path", default=None,
                       help="Tokenizer directory or file (default: --hf-config-path or --load).")
    group.add_argument("--extra-vocab-size", type=int, default=0,
                       help="Extra embedding rows beyond the tokenizer (explicit override).")
    group.add_argument("--dataset", default="mmap", choices=["mmap", "mock"],
                       help="Pretraining data source: Megatron indexed datasets given by "
                            "--data-path, or mock tokens.")
    group.add_argument("--sft-packing", action="store_true",
                       help="finetune: pack several samples per --seq-length sequence, with "
                            "attention and positions per sample (default: one padded sample "
                            "per sequence).")
    group.add_argument("--sft-train-on-prompt", action="store_true",
                       help="finetune: train on the prompt tokens too, not only the assistant "
                            "answers.")
    group.add_argument("--sft-loss-average", default="per-token",
                       choices=["per-token", "per-sequence"],
                       help="finetune: average the loss over the global batch's tokens, or "
                            "average each sequence's mean loss.")
    group.add_argument("--on-error", default="fail", choices=["skip", "fail"],
                       help="finetune: a malformed or untrainable SFT sample (bad JSON, missing "
                            "keys, empty answer, too long to pack) is skipped and listed with "
                            "its line, or stops the run.")
    group.add_argument("--no-torch-compile-layers", dest="torch_compile_layers",
                       action="store_false",
                       help="Do not torch.compile the transformer layers (compiled by default on "
                            "GPUs without Transformer Engine: fuses norms, rope, SwiGLU).")
    group.add_argument("--on-nonfinite", default="stop", choices=ON_NONFINITE,
                       help="A NaN/inf loss or gradient (checked with Megatron's "
                            "--check-for-nan-in-loss-and-grad, on by default) stops training "
                            "naming the iteration, or skips that iteration's update.")
    group.add_argument("--torchao-float8-recipe", default="tensorwise",
                       choices=["tensorwise", "rowwise"],
                       help="Scaling of torchao's float8 training, used for --fp8-format when "
                            "Transformer Engine is not installed (--fp8-recipe applies to TE).")
    lora = parser.add_argument_group("megatron-patch LoRA")
    lora.add_argument("--lora-rank", type=int, default=None,
                      help="Train LoRA adapters of this rank on the frozen model (default: "
                           "full fine-tuning). Base weights come from --pretrained-checkpoint "
                           "or a --load without adapters; checkpoints hold the adapters only.")
    lora.add_argument("--lora-alpha", type=float, default=None,
                      help="LoRA alpha; the update is scaled by alpha / rank (default: 2 * "
                           "rank).")
    lora.add_argument("--lora-dropout", type=float, default=0.0,
                      help="Dropout on the adapters' input (default 0).")
    lora.add_argument("--lora-target-modules", default="linear_qkv,linear_proj,linear_fc1,"
                                                       "linear_fc2",
                      help="Comma-separated linears to adapt (routed experts included): any "
                           "of linear_qkv, linear_proj, linear_fc1, linear_fc2 (default: all).")
    vlm = parser.add_argument_group("megatron-patch vision-language models")
    vlm.add_argument("--freeze-LM", dest="freeze_lm", action="store_true",
                     help="Do not train the language model.")
    vlm.add_argument("--freeze-ViT", dest="freeze_vit", action="store_true",
                     help="Do not train the vision tower.")
    vlm.add_argument("--freeze-projector", action="store_true",
                     help="Do not train the vision projector.")
    vlm.add_argument("--vlm-min-pixels", type=int, default=None,
                     help="Qwen2-VL: smallest image area after resizing (default: the model's "
                          "preprocessor_config.json, else 56*56).")
    vlm.add_argument("--vlm-max-pixels", type=int, default=None,
                     help="Qwen2-VL: largest image area after resizing (default: the model's "
                          "preprocessor_config.json, else 28*28*1280).")
    add_architecture_arguments(parser)
    backends = available_backends()
    parser.set_defaults(
        torch_compile_layers=backends.cuda and not backends.transformer_engine,
        apply_rope_fusion=backends.transformer_engine,
        gradient_accumulation_fusion=install_wgrad_accumulation(),
        masked_softmax_fusion=backends.apex,
        persist_layer_norm=backends.apex,
        use_cpu_initialization=not backends.cuda,
        # torch.compile'd fusions pay seconds of compilation for no gain on the CPU.
        bias_gelu_fusion=backends.cuda,
        bias_swiglu_fusion=backends.cuda,
        bias_dropout_fusion=backends.cuda,
        tensorboard_log_interval=1,
    )
    model_defaults = model_defaults or {}
    unknown = sorted(set(model_defaults) - {action.dest for action in parser._actions})
    if unknown:
        raise ValueError(f"model defaults name no Megatron argument: {unknown}")
    parser.set_defaults(**model_defaults)
    return parser


@contextlib.contextmanager
def _argv(argv: Sequence[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0] if saved else "megatron-patch", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _checkpoint_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The flags of ``argv`` that name where the model comes from."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--hf-config-path", "--load", "--pretrained-checkpoint", "--model-family"):
        pre.add_argument(flag)
    pre.add_argument("--ckpt-step", type=int)
    return pre.parse_known_args(list(argv))[0]


def adapter_checkpoint(load: str | None, step: int | None = None
                       ) -> tuple[LoraSettings, argparse.Namespace] | None:
    """The LoRA settings and saved args of an adapters-only checkpoint in ``load`` (None: no
    such checkpoint there, or none readable: the check before loading names the damage)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        saved = saved_args(load, step) if load else None
    except (Exception, CheckpointException):  # checkpoint.check_checkpoint_before_load's part
        return None
    settings = settings_from_args(saved) if saved is not None else None
    return (settings, saved) if settings is not None else None


def model_defaults_from_argv(argv: Sequence[str]) -> dict[str, Any]:
    """Architecture defaults from ``--hf-config-path`` or a converted checkpoint's metadata
    (``--load``'s, else ``--pretrained-checkpoint``'s or the base an adapters-only LoRA
    checkpoint in ``--load`` records), and that LoRA checkpoint's ``--lora-*`` settings."""
    known = _checkpoint_flags(argv)
    adapters = adapter_checkpoint(known.load, known.ckpt_step)
    lora = settings_as_args(adapters[0]) if adapters else {}
    base = known.pretrained_checkpoint or (adapters[1].pretrained_checkpoint if adapters
                                           else None)
    for checkpoint in (known.load, base):
        meta = checkpoint_metadata(checkpoint) if checkpoint else None
        if meta:
            return {**meta["megatron_args"], "model_family": meta["family"], **lora}
    if known.hf_config_path:
        hf = load_hf_config(known.hf_config_path)
        family = get_family(known.model_family) if known.model_family else \
            family_for_hf_config(hf)
        return {**family.hf_to_megatron(hf), "model_family": family.name, **lora}
    return lora


def parse_training_args(argv: Sequence[str] | None = None,
                        defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse and validate Megatron + megatron-patch arguments (``sys.argv`` when argv is None).

    ``defaults`` (Megatron argument values) replace the parser's defaults, e.g. an entry
    point's own; command-line flags still win.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    apply_cpu_compat()
    provider = functools.partial(
        add_patch_arguments, model_defaults={**(defaults or {}), **model_defaults_from_argv(argv)})
    with _argv(argv):
        args = parse_args(extra_args_provider=provider)
    check_training_config(args)
    lora = settings_from_args(args)  # refuse unusable LoRA flags before anything starts
    adapters = adapter_checkpoint(args.load, getattr(args, "ckpt_step", None))
    if adapters is not None:  # its settings are the defaults: given flags must agree
        check_resumed_settings(lora, adapters[0], f"--load {args.load}")
    validate_args(args, {})
    # Without Transformer Engine, FP8 runs through torchao (runtime/float8.py), not Megatron's TE
    # path: the recipe is kept in ``torchao_float8`` and Megatron's own fp8 switch turned off.
    args.torchao_float8 = None
    if args.fp8 and not available_backends().transformer_engine:
        args.torchao_float8, args.fp8 = args.torchao_float8_recipe, None
    _available_attention_backend(args)
    return args


def _available_attention_backend(args: argparse.Namespace) -> None:
    """``--attention-backend flash`` without flash-attn: the next-best backend, said once."""
    from megatron.core.transformer.enums import AttnBackend

    backends = available_backends()
    if args.attention_backend != AttnBackend.flash or backends.flash_attn:
        return
    backend, runs_on = flash_attention_backend(backends)
    if backend:
        args.attention_backend = AttnBackend[backend]
    if args.rank == 0:
        print(f"> --attention-backend flash: flash-attn is not installed; using {runs_on}",
              flush=True)
