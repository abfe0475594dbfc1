"""Our base + adapter logits against Hugging Face + PEFT's on the same tokens (any TP/PP)."""

from __future__ import annotations

import gc
import logging
from functools import partial
from pathlib import Path

import torch

from megatron_patch.models.common.lora import settings_from_args
from megatron_patch.training.lora_checkpoint import saved_args

log = logging.getLogger(__name__)


def lora_flags(lora_checkpoint: str | Path) -> list[str]:
    """The ``--lora-*`` flags a LoRA checkpoint was trained (or imported) with."""
    saved = saved_args(lora_checkpoint)
    settings = settings_from_args(saved) if saved is not None else None
    if settings is None:
        raise ValueError(f"{lora_checkpoint}: not a LoRA checkpoint (no saved --lora-rank); "
                         "pass the output of LoRA training or of megatron-patch import-lora")
    return ["--lora-rank", str(settings.rank), "--lora-alpha", f"{settings.alpha:g}",
            "--lora-target-modules", ",".join(settings.targets)]


def peft_logits(hf_dir: str | Path, tokens: torch.Tensor, *, adapter_dir: str | Path
                ) -> torch.Tensor:
    """fp32 logits of the HF model in ``hf_dir`` with the PEFT adapter ``adapter_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    try:
        from peft import PeftModel
    except ImportError:  # the next-best reference: the adapter merged into the HF weights
        from megatron_patch.conversion.lora_merge import merge_into_hf_model

        log.warning("peft is not installed (pip install 'megatron-patch[lora]'): the reference "
                    "is the HF model with the adapter merged by megatron-patch")
        merge_into_hf_model(model, adapter_dir)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    del model
    gc.collect()
    return logits


def compare_lora_logits(hf_dir: str | Path, adapter_dir: str | Path,
                        lora_checkpoint: str | Path, **kwargs) -> float:
    """Max |HF + PEFT - Megatron base + adapter| logit (``compare_logits``'s keyword arguments:
    ``tp``, ``pp``, ``batch_size`` ...); the base is the one the LoRA checkpoint records."""
    from megatron_patch.conversion.verify.logits import compare_logits

    extra = [*kwargs.pop("extra_args", ()), *lora_flags(lora_checkpoint)]
    return compare_logits(hf_dir, lora_checkpoint, extra_args=extra,
                          reference=partial(peft_logits, adapter_dir=adapter_dir), **kwargs)
