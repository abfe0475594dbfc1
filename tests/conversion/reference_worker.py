"""torchrun worker: converted remote-code checkpoints (Baichuan, ChatGLM) against HF references.

``python -m torch.distributed.run --nproc-per-node N -m tests.conversion.reference_worker CASES
OUT`` reads a JSON list of ``{"id", "reference", "mcore", "tp", "pp", "alibi"}`` and writes
``{id: max_abs_diff}`` (from rank 0) to OUT. The Megatron model is the converted checkpoint
``mcore``, built and loaded as training does (its own family and arguments); the reference
logits come from the transformers model in ``reference``, with ``alibi`` from transformers'
Bloom ALiBi tensor added to its attention scores and its rotary embedding made the identity
(every position 0) - Baichuan-13B's mathematics.
"""

import sys
from pathlib import Path

import torch

from megatron_patch.conversion.verify.logits import compare_logits, hf_logits
from tests.conversion.parity_worker import BATCH, SEQ
from tests.launch import serve_cases


def llama_with_alibi_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the Llama model in ``hf_dir`` with Bloom's ALiBi instead of rotary."""
    from transformers import AutoModelForCausalLM
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    batch, length = tokens.shape
    heads = model.config.num_attention_heads
    alibi = build_alibi_tensor(torch.ones(batch, length), heads, torch.float32)
    causal = torch.full((length, length), float("-inf")).triu(1)
    mask = alibi.view(batch, heads, 1, length) + causal
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask,
                     position_ids=torch.zeros_like(tokens)).logits.float()


def _evaluate(case: dict) -> float:
    reference = llama_with_alibi_logits if case.get("alibi") else hf_logits
    return compare_logits(case["reference"], case["mcore"], tp=case["tp"], pp=case["pp"],
                          batch_size=BATCH, seq_length=SEQ, reference=reference)


def main(cases_file: str, out_file: str) -> None:
    serve_cases(cases_file, out_file, _evaluate)

if __name__ == "__main__":
    main(*sys.argv[1:])
