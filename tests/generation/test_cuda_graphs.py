"""On GPUs: decode steps replayed as CUDA graphs give HF ``generate``'s greedy tokens (fp32),
at TP=1 and, with two GPUs, TP=2 (NCCL inside the graph). Run on a CUDA machine:
``python -m pytest -q tests/generation/test_cuda_graphs.py``."""

import pytest
import torch

from tests.generation.conftest import run_generation_worker

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# case -> whether its decode step must capture (bloom: correct either way; eager if it cannot)
CASES = {"llama3": True, "qwen3": True, "bloom": False}


def test_cuda_graph_decoding_equals_hf_generate(tiny_checkpoint, hf_reference, tmp_path):
    gpus = min(torch.cuda.device_count(), 2)
    runs = [{"id": f"{case}-tp{tp}", "mcore": str(tiny_checkpoint(case)[1]), "tp": tp, "pp": 1,
             "layout": "roll", "checks": [], "dtype": "fp32", "cuda_graphs": True}
            for case in CASES for tp in range(1, gpus + 1)]
    results = run_generation_worker(runs, tmp_path, nproc=gpus)
    for run in runs:
        case, result = run["id"].rsplit("-", 1)[0], results[run["id"]]
        print(f"{run['id']}: CUDA graphs {'used' if result['cuda_graphs'] else 'NOT used'}")
        assert result["cuda_graphs"] or not CASES[case], f"{run['id']}: capture fell back"
        assert result["greedy"] == hf_reference.generate(case, None), run["id"]
