"""Logits of a vision-language checkpoint against transformers on the same images and text.

The family's :meth:`~megatron_patch.models.common.vision.VisionLanguageFamily.verify_batch`
gives both models' inputs (:class:`~megatron_patch.models.common.vision.VerifyBatch`); by
default (LLaVA) Megatron's input holds one image token per image (the model expands it to the
image's embeddings) and transformers' holds the token repeated once per embedding, as its
processor writes it. Both give logits over the same combined sequence. The Megatron side is
built and loaded as training does (``get_model``, ``load_checkpoint``) at any TP/PP, the
vision tower on the first pipeline stage.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.training.training import get_model

from megatron_patch.conversion.layout import parse_megatron_args
from megatron_patch.conversion.verify.ranks import max_abs_diff, rank_device
from megatron_patch.models.builder import gpt_model_provider
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.common.vision import VerifyBatch, VisionLanguageFamily
from megatron_patch.models.registry import family_for_hf_config
from megatron_patch.training.checkpoint import load_megatron_checkpoint
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.pretrain import set_padded_vocab


def verify_batch(hf_config: dict, batch_size: int, text_length: int, seed: int = 0
                 ) -> VerifyBatch:
    """The family's verification batch (the same on every rank)."""
    family = family_for_hf_config(hf_config)
    if not isinstance(family, VisionLanguageFamily):
        raise ValueError(f"{family.name} is not a vision-language family")
    return family.verify_batch(hf_config, batch_size, text_length, seed)


def hf_vlm_logits(hf_dir: str | Path, **inputs: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the transformers model in ``hf_dir`` on the CPU for ``inputs``."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    del model
    gc.collect()
    return logits


def _logits_only(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
    return output


def on_device(inputs: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """``inputs`` with every tensor on this rank's device."""
    return {k: v.to(rank_device()) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _forward_step(data_iterator, model):
    output = model(**on_device(next(data_iterator)))
    return (output[0] if isinstance(output, tuple) else output), _logits_only


def vlm_forward_logits(model: list[torch.nn.Module], batch: VerifyBatch) -> torch.Tensor | None:
    """Full-vocabulary logits of the chunks over the combined sequence; None off the last
    pipeline stage."""
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter([batch.megatron]), model=model,
            num_microbatches=1, seq_length=batch.seq_length,
            micro_batch_size=batch.hf["input_ids"].shape[0], forward_only=True,
            collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0]).float()


def build_vlm_model(args) -> list[torch.nn.Module]:
    """This rank's model chunk, built as training builds it (vision tower on the first stage)."""
    return get_model(gpt_model_provider(args), ModelType.encoder_or_decoder, wrap_with_ddp=False)


def compare_vlm_logits(hf_dir: str | Path, mcore_dir: str | Path, *, tp: int = 1, pp: int = 1,
                       batch_size: int = 2, text_length: int = 24, seed: int = 0,
                       extra_args: Sequence[str] = ()) -> float:
    """Max |transformers - Megatron| logit on random images and text, the same on every rank
    (call on every rank of a world of ``tp * pp`` processes or a multiple); ``extra_args``:
    more Megatron flags (e.g. ``--sequence-parallel``)."""
    hf_config = load_hf_config(hf_dir)
    batch = verify_batch(hf_config, batch_size, text_length, seed)
    seq_length = batch.seq_length
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = parse_megatron_args([
        "--load", str(mcore_dir), "--hf-config-path", str(hf_dir),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", str(batch_size),
        "--global-batch-size", str(batch_size * max(1, world // (tp * pp))),
        "--seq-length", str(seq_length), "--finetune", "--no-load-optim", "--no-load-rng",
        "--attention-dropout", "0", "--hidden-dropout", "0", *extra_args])
    initialize(args)
    try:
        set_padded_vocab(args, None)
        rows = int((hf_config.get("text_config") or hf_config)["vocab_size"])
        reference = torch.empty(batch_size, seq_length, rows)
        if torch.distributed.get_rank() == 0:
            reference = hf_vlm_logits(hf_dir, **batch.hf)
        reference = reference.to(rank_device())
        torch.distributed.broadcast(reference, src=0)
        model = build_vlm_model(args)
        load_megatron_checkpoint(model, None, None)
        return max_abs_diff(vlm_forward_logits(model, batch), reference)
    finally:
        teardown_parallel_state()
