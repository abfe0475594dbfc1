"""torchrun worker: LoRA logits comparisons in one process group (2 ranks).

``python -m torch.distributed.run --nproc-per-node 2 -m tests.lora.lora_worker CASES OUT``
reads a JSON list of ``{"id", "hf", "adapter", "lora", "tp", "pp"[, "etp", "sp"]}`` and writes
``{id: max |HF + PEFT - Megatron base + adapter| logit}`` (from rank 0) to OUT; a case with
``"train": N`` instead gives the largest relative loss and gradient-norm differences of N LoRA
training steps on both sides.
"""

import sys

import torch

from megatron_patch.conversion.verify.lora import compare_lora_logits
from megatron_patch.conversion.verify.training import compare_training
from tests.launch import serve_cases


def _evaluate(case: dict) -> float | list[float]:
    if "train" in case:
        curves = compare_training(case["hf"], case["lora"], steps=case["train"], tp=case["tp"],
                                  pp=case["pp"], etp=case.get("etp"), seq_length=32,
                                  adapter_dir=case["adapter"],
                                  extra_args=["--sequence-parallel"] * case.get("sp", False))
        if torch.distributed.get_rank() == 0:
            print(curves.table(1e-4), flush=True)
        return [max(curves.loss_rel), max(curves.grad_norm_rel)]
    return compare_lora_logits(case["hf"], case["adapter"], case["lora"], tp=case["tp"],
                               pp=case["pp"], etp=case.get("etp"), batch_size=2, seq_length=32)


if __name__ == "__main__":
    serve_cases(*sys.argv[1:], _evaluate)
