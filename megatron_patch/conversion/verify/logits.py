"""Run an HF model and its Megatron checkpoint on the same tokens and compare the logits.

The Megatron side is built and loaded exactly as training does (``parse_training_args`` with
``--load``, ``get_model``, Megatron's ``load_checkpoint``), at any
TP/PP/EP/ETP, so a passing comparison also shows that training can start from the checkpoint.
Call :func:`compare_logits` on every rank of a world of :func:`world_size` (or a multiple)
processes.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.training.training import get_model

from megatron_patch.conversion.layout import parse_megatron_args
from megatron_patch.conversion.verify.ranks import max_abs_diff, rank_device
from megatron_patch.conversion.verify.vlm import compare_vlm_logits
from megatron_patch.conversion.vlm import vlm_family
from megatron_patch.models.builder import gpt_model_provider
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.common.lora import settings_from_args
from megatron_patch.training.checkpoint import load_megatron_checkpoint
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.lora import load_lora_model
from megatron_patch.training.pretrain import set_padded_vocab
from megatron_patch.utils.metadata import checkpoint_metadata


def world_size(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None) -> int:
    """Smallest process count for TP x PP and EP x ETP x PP at once (Megatron tiles both)."""
    return math.lcm(tp, ep * (tp if etp is None else etp)) * pp


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the HF model in ``hf_dir``, run on the CPU (loaded offline)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    del model
    gc.collect()
    return logits


def _forward_step(data_iterator, model):
    tokens, position_ids = (t.to(rank_device()) for t in next(data_iterator))
    return model(tokens, position_ids, None), _logits_only


def _logits_only(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
    return output


def forward_logits(model: list[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits of Megatron model chunks (any TP/PP); None off the last stage."""
    for chunk in model:
        chunk.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    batches = [iter([(tokens, positions)]) for _ in model]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=batches if len(batches) > 1 else batches[0],
            model=model, num_microbatches=1, seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0], forward_only=True, collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0]).float()


def reference_logits(hf_dir: str | Path, tokens: torch.Tensor,
                     compute: Callable[[str | Path, torch.Tensor], torch.Tensor] = hf_logits
                     ) -> torch.Tensor:
    """HF logits computed on rank 0 (one HF model in memory) and broadcast to every rank.

    ``compute(hf_dir, tokens)`` gives them (default: :func:`hf_logits`).
    """
    rows = int(load_hf_config(hf_dir)["vocab_size"])
    reference = torch.empty(*tokens.shape, rows)
    if torch.distributed.get_rank() == 0:
        reference = compute(hf_dir, tokens)
    reference = reference.to(rank_device())
    torch.distributed.broadcast(reference, src=0)
    return reference


def random_tokens(vocab: int, batch_size: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """The same random token ids on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_length), generator=generator)


def load_megatron_model(args) -> list[torch.nn.Module]:
    """This rank's chunks of the checkpoint at ``args.load``, built and loaded as training
    does (without DDP); a LoRA checkpoint (``--lora-rank``) with its base."""
    if settings_from_args(args) is not None:
        return load_lora_model(args)
    model = get_model(gpt_model_provider(args), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    load_megatron_checkpoint(model, None, None)
    return model


def megatron_logits(args, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits of the checkpoint at ``args.load``, built and loaded as training does."""
    return forward_logits(load_megatron_model(args), tokens)


def compare_logits(hf_dir: str | Path, mcore_dir: str | Path, *, tp: int = 1, pp: int = 1,
                   ep: int = 1, etp: int | None = None, extra_args: Sequence[str] = (),
                   batch_size: int = 2, seq_length: int = 64, seed: int = 0,
                   reference: Callable[[str | Path, torch.Tensor], torch.Tensor] = hf_logits
                   ) -> float:
    """Max |HF - Megatron| logit over random tokens, identical on every rank.

    ``reference(hf_dir, tokens)`` computes the HF logits (default: the model in ``hf_dir``).
    ``extra_args`` are further Megatron flags for the model (e.g. ``--moe-grouped-gemm``).
    Vision-language checkpoints are compared on random images and ``seq_length`` text tokens
    (:func:`~megatron_patch.conversion.verify.vlm.compare_vlm_logits`).

    Sets up Megatron's parallel state (TP ``tp``, PP ``pp``, expert parallelism ``ep`` with
    expert TP ``etp`` (default ``tp``), data parallel over the remaining ranks) and tears it
    down again, so several comparisons can run in one process group.
    """
    if vlm_family(checkpoint_metadata(mcore_dir), load_hf_config(hf_dir)) is not None:
        return compare_vlm_logits(hf_dir, mcore_dir, tp=tp, pp=pp, batch_size=batch_size,
                                  text_length=seq_length, seed=seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # what Megatron's arguments read
    global_batch = str(batch_size * max(1, world // (tp * pp)))
    experts = ["--expert-model-parallel-size", str(ep)] + \
        (["--expert-tensor-parallel-size", str(etp)] if etp else [])
    args = parse_megatron_args([
        "--load", str(mcore_dir), "--hf-config-path", str(hf_dir), *experts,
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", str(batch_size), "--global-batch-size", global_batch,
        "--seq-length", str(seq_length), "--finetune", "--no-load-optim", "--no-load-rng",
        "--attention-dropout", "0", "--hidden-dropout", "0", *extra_args,
    ])
    initialize(args)
    try:
        set_padded_vocab(args, None)
        tokens = random_tokens(int(load_hf_config(hf_dir)["vocab_size"]), batch_size,
                               seq_length, seed)
        expected = reference_logits(hf_dir, tokens, reference)
        return max_abs_diff(megatron_logits(args, tokens), expected)
    finally:
        teardown_parallel_state()
