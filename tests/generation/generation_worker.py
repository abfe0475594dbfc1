"""torchrun worker: generations and NLLs of converted tiny models at several layouts, one launch.

``python -m torch.distributed.run --nproc-per-node 2 -m tests.generation.generation_worker SPEC
OUT`` reads a JSON spec ``{"prompts", "windows", "max_new_tokens", "runs": [{"id", "mcore",
"tp", "pp", "layout", "checks"[, "dtype", "cuda_graphs"]}]}`` and writes, from rank 0,
``{run id: results}``: greedy tokens, the NLL of the windows and whether CUDA graphs were used;
with ``checks`` "eos" greedy tokens stopping at an EOS id, "sampling" seeded samples,
"sampling+" also samples at batch size 1, again and with another seed. Each run sets up its
own Megatron parallel state and loads its checkpoint as the CLI does.
"""

import json
import sys
from pathlib import Path

import torch

from megatron_patch.generation.engine import Generator, generate
from megatron_patch.generation.model import (
    load_inference_model,
    load_tokenizer,
    parse_inference_args,
)
from megatron_patch.generation.perplexity import negative_log_likelihood
from megatron_patch.generation.sampling import SamplingParams
from megatron_patch.generation.stopping import StopChecker
from megatron_patch.training.initialize import teardown_parallel_state

SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3}


def _tokens(completions):
    return [c.tokens for c in completions]


def _run(spec: dict, run: dict) -> dict:
    args = parse_inference_args(run["mcore"], tp=run["tp"], pp=run["pp"],
                                dtype=run.get("dtype", "auto"))
    tokenizer = load_tokenizer(args)
    loaded = load_inference_model(args, tokenizer)
    try:
        engine = Generator(loaded.model, vocab_rows=loaded.vocab_rows, layout=run["layout"],
                           cuda_graphs=run.get("cuda_graphs", False))

        def complete(params, batch_size=3, eos=()):
            return generate(engine, spec["prompts"], max_new_tokens=spec["max_new_tokens"],
                            params=params, stop=StopChecker(tokenizer, eos),
                            batch_size=batch_size)

        greedy = _tokens(complete(SamplingParams(greedy=True)))
        results = {"greedy": greedy, "cuda_graphs": engine.cuda_graphs,
                   "nll": negative_log_likelihood(loaded.model, spec["windows"],
                                                  vocab_rows=loaded.vocab_rows, batch_size=2)}
        if "eos" in run["checks"]:
            stopped = complete(SamplingParams(greedy=True), eos=[greedy[0][4]])
            results.update(eos=greedy[0][4], eos_stopped=_tokens(stopped),
                           eos_reasons=[c.finish_reason for c in stopped])
        if "sampling" in run["checks"] or "sampling+" in run["checks"]:
            results["sampled"] = _tokens(complete(SamplingParams(seed=7, **SAMPLING)))
        if "sampling+" in run["checks"]:
            results["sampled_again"] = _tokens(complete(SamplingParams(seed=7, **SAMPLING)))
            results["sampled_batch1"] = _tokens(complete(SamplingParams(seed=7, **SAMPLING), 1))
            results["sampled_seed8"] = _tokens(complete(SamplingParams(seed=8, **SAMPLING)))
        return results
    finally:
        teardown_parallel_state()


def main(spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    results = {run["id"]: _run(spec, run) for run in spec["runs"]}
    if torch.distributed.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
