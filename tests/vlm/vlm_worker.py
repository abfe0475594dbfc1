"""torchrun worker: several vision-language checks in one 2-rank process group.

``python -m torch.distributed.run --nproc-per-node 2 -m tests.vlm.vlm_worker CASES OUT`` reads a
JSON list of ``{"id", "hf", "mcore", "tp", "pp"}`` (logits parity: the max abs diff) or, with
``"freeze": [flags]``, a training step's gradients: ``{part: [trainable, has gradient]}`` for
the language model, vision tower and projector. Writes ``{id: result}`` from rank 0.
"""

import json
import sys
import time
from pathlib import Path

import torch

from megatron_patch.conversion.layout import parse_megatron_args
from megatron_patch.conversion.verify_vlm import build_vlm_model, compare_vlm_logits, vlm_inputs
from megatron_patch.models.llava import image_token_id, image_tokens
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.pretrain import set_padded_vocab

PARTS = ("language_model", "vision_model", "vision_projection")


def _gradients(case: dict) -> dict[str, list[bool]]:
    """One forward/backward of the LM loss at TP=case["tp"] with the freezing flags."""
    from megatron_patch.models.common.hf_config import load_hf_config

    hf = load_hf_config(case["hf"])
    tokens, text = image_tokens(hf), 12
    args = parse_megatron_args([
        "--load", case["mcore"], "--hf-config-path", case["hf"],
        "--tensor-model-parallel-size", str(case["tp"]), "--micro-batch-size", "2",
        "--global-batch-size", "2", "--seq-length", str(text - 1 + tokens), "--finetune",
        "--attention-dropout", "0", "--hidden-dropout", "0", *case["freeze"]])
    initialize(args)
    try:
        set_padded_vocab(args, None)
        (model,) = build_vlm_model(args)
        ids, _, images = vlm_inputs(hf, tokens, image_token_id(hf), 2, text)
        labels = torch.roll(ids, -1, dims=1)
        loss, mask = model(images, ids, None, None, labels=labels,
                           loss_mask=torch.ones_like(ids, dtype=torch.float),
                           num_image_tiles=torch.ones(2, dtype=torch.int))
        (loss * mask).sum().backward()
        return {part: [all(p.requires_grad for p in getattr(model, part).parameters()),
                       any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                           for p in getattr(model, part).parameters())] for part in PARTS}
    finally:
        teardown_parallel_state()


def main(cases_file: str, out_file: str) -> None:
    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        start = time.perf_counter()
        if "freeze" in case:
            results[case["id"]] = _gradients(case)
        else:
            results[case["id"]] = compare_vlm_logits(case["hf"], case["mcore"], tp=case["tp"],
                                                     pp=case["pp"])
        if torch.distributed.get_rank() == 0:
            print(f"PARITY {case['id']} {time.perf_counter() - start:.1f}s", flush=True)
    if torch.distributed.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
