"""Resuming from a torch_dist checkpoint continues exactly like an uninterrupted run."""

import pytest

from tests.launch import MOCK_DATA, TINY_MODEL, pretrain

TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
         "--train-iters", "6", "--log-interval", "1", "--eval-iters", "0", "--seed", "5"]


@pytest.mark.distributed
def test_resume_is_bit_identical(tmp_path):
    """With the distributed optimizer over torch's Adam (no TE/apex), whose fresh state
    Megatron's load could not read (``AssertionError`` in ``DistributedOptimizer.state_dict``)
    and whose step count it restarted; the plain optimizer's bit-identical resume after a kill
    is tests/reliability/test_crash_resume.py's."""
    optimizer = ["--use-distributed-optimizer"]
    straight = pretrain(TINY_MODEL + MOCK_DATA + TRAIN + optimizer, nproc=2)
    ckpt = str(tmp_path / "ckpt")
    first = pretrain(TINY_MODEL + MOCK_DATA + TRAIN + optimizer
                     + ["--save", ckpt, "--save-interval", "3", "--exit-interval", "3"], nproc=2)
    assert sorted(first) == [1, 2, 3]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (tmp_path / "ckpt" / "iter_0000003").is_dir()
    resumed = pretrain(TINY_MODEL + MOCK_DATA + TRAIN + optimizer
                       + ["--load", ckpt, "--save", ckpt, "--save-interval", "3"], nproc=2)
    assert sorted(resumed) == [4, 5, 6]
    for iteration in (4, 5, 6):
        assert resumed[iteration] == straight[iteration], (iteration, resumed, straight)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


@pytest.mark.distributed
def test_resume_at_other_layout(tmp_path):
    """A checkpoint written at TP=2 resumes at PP=2 with the same next losses (resharding)."""
    ckpt = str(tmp_path / "ckpt")
    straight = pretrain(TINY_MODEL + MOCK_DATA + TRAIN + ["--tensor-model-parallel-size", "2"],
                        nproc=2)
    pretrain(TINY_MODEL + MOCK_DATA + TRAIN + ["--tensor-model-parallel-size", "2", "--save",
                                               ckpt, "--save-interval", "3",
                                               "--exit-interval", "3"], nproc=2)
    resumed = pretrain(TINY_MODEL + MOCK_DATA + TRAIN + ["--pipeline-model-parallel-size", "2",
                                                          "--load", ckpt], nproc=2)
    for iteration in (4, 5, 6):
        assert resumed[iteration] == pytest.approx(straight[iteration], rel=1e-5)
