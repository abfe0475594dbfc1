"""torchrun worker: several vision-language checks in one 2-rank process group.

``python -m torch.distributed.run --nproc-per-node 2 -m tests.vlm.vlm_worker CASES OUT`` reads a
JSON list of ``{"id", "hf", "mcore", "tp", "pp"}`` (logits parity: the max abs diff; optional
``"args"``: more Megatron flags) or, with ``"freeze": [flags]``, a training step's gradients:
``{part: [trainable, has gradient]}`` for the language model, vision tower and projector, or,
with ``"mismatch": true``, the error of a forward whose image tokens do not match its images,
or, with ``"save": DIR``, the checkpoint loaded at ``tp``/``pp`` and saved again into DIR.
Writes ``{id: result}`` from rank 0.
"""

import sys

import torch
from megatron.core.pipeline_parallel.schedules import custom_backward

from megatron_patch.conversion.layout import parse_megatron_args
from megatron_patch.conversion.verify.vlm import (
    build_vlm_model,
    compare_vlm_logits,
    on_device,
    verify_batch,
)
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.pretrain import set_padded_vocab
from tests.launch import serve_cases

PARTS = ("language_model", "vision_model", "vision_projection")


def _gradients(case: dict) -> dict[str, list[bool]]:
    """One forward/backward of the LM loss at TP=case["tp"] with the freezing flags."""
    from megatron_patch.models.common.hf_config import load_hf_config

    batch = verify_batch(load_hf_config(case["hf"]), 2, 12)
    args = parse_megatron_args([
        "--load", case["mcore"], "--hf-config-path", case["hf"],
        "--tensor-model-parallel-size", str(case["tp"]), "--micro-batch-size", "2",
        "--global-batch-size", "2", "--seq-length", str(batch.seq_length), "--finetune",
        "--attention-dropout", "0", "--hidden-dropout", "0", *case["freeze"]])
    initialize(args)
    try:
        set_padded_vocab(args, None)
        (model,) = build_vlm_model(args)
        ids = batch.megatron["input_ids"]
        loss_mask = torch.ones_like(ids, dtype=torch.float)
        output = model(**on_device(batch.megatron), labels=torch.roll(ids, -1, dims=1),
                       loss_mask=loss_mask)
        loss, mask = output if isinstance(output, tuple) else (output, loss_mask)
        # Megatron's schedules call the autograd engine directly; Tensor.backward (a torch
        # function) would run it outside the CPU runtime's device mode, where the backward of
        # sequence parallelism's collectives asks for CUDA
        custom_backward((loss * mask).sum(), None)
        return {part: [all(p.requires_grad for p in getattr(model, part).parameters()),
                       any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                           for p in getattr(model, part).parameters())] for part in PARTS}
    finally:
        teardown_parallel_state()


def _mismatch_error(case: dict) -> str:
    """The message of a forward with one image token too few (TP=1)."""
    from megatron_patch.models.common.hf_config import load_hf_config

    batch = verify_batch(load_hf_config(case["hf"]), 2, 12)
    args = parse_megatron_args([
        "--load", case["mcore"], "--hf-config-path", case["hf"], "--micro-batch-size", "2",
        "--global-batch-size", "4", "--seq-length", str(batch.seq_length), "--finetune"])
    initialize(args)
    try:
        set_padded_vocab(args, None)
        (model,) = build_vlm_model(args)
        ids = batch.megatron["input_ids"].clone()
        ids[ids == model.image_token_id] = torch.where(
            torch.arange(int((ids == model.image_token_id).sum())) == 0, 0, model.image_token_id)
        try:
            model(**{**batch.megatron, "input_ids": ids})
        except ValueError as error:
            return str(error)
        return "no error"
    finally:
        teardown_parallel_state()


def _resave(case: dict) -> str:
    """Load the checkpoint at TP/PP = case["tp"]/case["pp"] and save it (Megatron's
    ``save_checkpoint``, torch_dist) into case["save"]; returns that directory."""
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint

    args = parse_megatron_args([
        "--load", case["mcore"], "--save", case["save"], "--hf-config-path", case["hf"],
        "--tensor-model-parallel-size", str(case["tp"]),
        "--pipeline-model-parallel-size", str(case["pp"]), "--micro-batch-size", "1",
        "--seq-length", "64", "--finetune", "--no-load-optim", "--no-load-rng",
        "--no-save-optim", "--no-save-rng", "--save-interval", "1"])
    initialize(args)
    try:
        set_padded_vocab(args, None)
        model = build_vlm_model(args)
        load_checkpoint(model, None, None, strict=True)
        save_checkpoint(1, model, None, None, 0)
        return case["save"]
    finally:
        teardown_parallel_state()


def _evaluate(case: dict) -> object:
    if "freeze" in case:
        return _gradients(case)
    if case.get("mismatch"):
        return _mismatch_error(case)
    if "save" in case:
        return _resave(case)
    return compare_vlm_logits(case["hf"], case["mcore"], tp=case["tp"], pp=case["pp"],
                              extra_args=case.get("args", ()))


def main(cases_file: str, out_file: str) -> None:
    serve_cases(cases_file, out_file, _evaluate)

if __name__ == "__main__":
    main(*sys.argv[1:3])
