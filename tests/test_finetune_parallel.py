"""Packed SFT at TP=2 with sequence parallelism and at PP=2 reproduces the single-process losses.

Packed micro-batches run as one THD sequence of ``micro_batch_size * seq_length`` tokens, which
is also the activation shape pipeline stages exchange.
"""

import pytest

from tests.launch import REPO, TINY_MODEL, losses, run_module

SFT = [*TINY_MODEL, "--seq-length", "128", "--max-position-embeddings", "128",
       "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "3",
       "--log-interval", "1", "--eval-iters", "0", "--seed", "11", "--num-workers", "0",
       "--patch-tokenizer-type", "TinyTokenizer", "--split", "100,0,0", "--sft-packing",
       "--data-path", str(REPO / "megatron_patch" / "assets" / "tiny_chat.jsonl")]


def _finetune(extra: list[str], nproc: int) -> dict[int, float]:
    found = losses(run_module("megatron_patch.training.finetune", SFT + extra, nproc=nproc).stdout)
    assert sorted(found) == [1, 2, 3], found
    return found


@pytest.fixture(scope="module")
def reference() -> dict[int, float]:
    return _finetune([], 1)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--pipeline-model-parallel-size", "2"],
], ids=["tp2-sp", "pp2"])
def test_packed_sft_layout_matches_single_process(reference, layout):
    got = _finetune(layout, 2)
    for iteration, loss in reference.items():
        assert got[iteration] == pytest.approx(loss, rel=1e-5), (iteration, got, reference)
