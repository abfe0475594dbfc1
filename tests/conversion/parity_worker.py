"""torchrun worker: many HF-vs-Megatron logits comparisons in one process group.

``python -m torch.distributed.run --nproc-per-node N -m tests.conversion.parity_worker CASES OUT``
reads a JSON list of cases and writes ``{id: max_abs_diff}`` (from rank 0) to OUT. A case is
``{"id", "hf", "tp", "pp"}`` (optionally ``"ep"``, ``"etp"`` for expert parallelism) plus either
``"mcore"`` (a converted checkpoint, loaded the way training loads it; optionally ``"extra"``
Megatron flags) or nothing (the model built by ``build_model_from_hf_config``); ``"seq"`` sets
the sequence length of a checkpoint case (default 32).
"""

import sys

from megatron.core import parallel_state

from megatron_patch.conversion import build_model_from_hf_config
from megatron_patch.conversion.verify.logits import (
    compare_logits,
    forward_logits,
    max_abs_diff,
    random_tokens,
    reference_logits,
)
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.training.initialize import teardown_parallel_state
from tests.launch import serve_cases

BATCH, SEQ = 2, 32


def _from_hf_weights(hf: str, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> float:
    parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=etp)
    try:
        model = build_model_from_hf_config(hf)
        tokens = random_tokens(load_hf_config(hf)["vocab_size"], BATCH, SEQ)
        return max_abs_diff(forward_logits([model], tokens), reference_logits(hf, tokens))
    finally:
        teardown_parallel_state()


def _evaluate(case: dict) -> float:
    experts = {"ep": case.get("ep", 1), "etp": case.get("etp")}
    if "mcore" in case:
        return compare_logits(case["hf"], case["mcore"], tp=case["tp"], pp=case["pp"],
                              batch_size=BATCH, seq_length=case.get("seq", SEQ),
                              extra_args=case.get("extra", ()), **experts)
    return _from_hf_weights(case["hf"], case["tp"], case["pp"], **experts)


def main(cases_file: str, out_file: str) -> None:
    serve_cases(cases_file, out_file, _evaluate)

if __name__ == "__main__":
    main(*sys.argv[1:])
