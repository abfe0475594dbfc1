"""TP/PP/SP/VPP/DP/CP runs on CPU (gloo) reproduce the single-process losses for one seed."""

import pytest

from tests.launch import MOCK_DATA, TINY_MODEL, pretrain

TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
         "--train-iters", "3", "--log-interval", "1", "--eval-iters", "0", "--seed", "11"]


@pytest.fixture(scope="module")
def reference() -> dict[int, float]:
    return pretrain(TINY_MODEL + MOCK_DATA + TRAIN, nproc=1)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2"],
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--pipeline-model-parallel-size", "2"],
        ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
        [],  # data parallel 2
        ["--use-distributed-optimizer"],
        ["--context-parallel-size", "2"],
    ],
    ids=["tp2", "tp2-sp", "pp2", "pp2-vpp2", "dp2", "dp2-distopt", "cp2"],
)
def test_layout_matches_single_process(reference, layout):
    got = pretrain(TINY_MODEL + MOCK_DATA + TRAIN + layout, nproc=2)
    assert got.keys() == reference.keys()
    for iteration, loss in reference.items():
        assert got[iteration] == pytest.approx(loss, rel=1e-5), (iteration, got, reference)


@pytest.mark.distributed
def test_multi_query_attention_at_tp2_matches_single_process():
    """One key/value head for two TP ranks (with SP): Megatron's all-gathered QKV path."""
    mqa = TINY_MODEL + MOCK_DATA + TRAIN + ["--num-query-groups", "1"]
    reference = pretrain(mqa, nproc=1)
    got = pretrain(mqa + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], nproc=2)
    assert got.keys() == reference.keys()
    for iteration, loss in reference.items():
        assert got[iteration] == pytest.approx(loss, rel=1e-5), (iteration, got, reference)


def test_loss_falls(reference):
    assert reference[3] < reference[1]
