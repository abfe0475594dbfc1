"""Our base + adapter logits against Hugging Face + PEFT's on the same tokens (any TP/PP)."""

from __future__ import annotations

import gc
import logging
from functools import partial
from pathlib import Path

import torch

log = logging.getLogger(__name__)


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
    ``tp``, ``pp``, ``batch_size`` ...); the LoRA settings and the base are the ones the LoRA
    checkpoint records (:func:`megatron_patch.arguments.model_defaults_from_argv`)."""
    from megatron_patch.conversion.verify.logits import compare_logits

    return compare_logits(hf_dir, lora_checkpoint,
                          reference=partial(peft_logits, adapter_dir=adapter_dir), **kwargs)
