"""torchrun worker: LoRA logits comparisons in one process group (2 ranks).

``python -m torch.distributed.run --nproc-per-node 2 -m tests.lora.lora_worker CASES OUT``
reads a JSON list of ``{"id", "hf", "adapter", "lora", "tp", "pp"}`` and writes
``{id: max |HF + PEFT - Megatron base + adapter| logit}`` (from rank 0) to OUT.
"""

import sys

from megatron_patch.lora.verify import compare_lora_logits
from tests.launch import serve_cases


def _evaluate(case: dict) -> float:
    return compare_lora_logits(case["hf"], case["adapter"], case["lora"], tp=case["tp"],
                               pp=case["pp"], batch_size=2, seq_length=32)


if __name__ == "__main__":
    serve_cases(*sys.argv[1:], _evaluate)
