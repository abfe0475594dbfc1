"""NaN/inf losses and gradients are caught before the update, named with their iteration.

Real runs with a poisoned forward step (``tests.reliability.fault_worker``): the default stops
with the iteration and the ranks; ``--on-nonfinite skip`` skips exactly the poisoned updates
(the learning-rate schedule does not advance) and trains on with finite losses.
"""

import math
import re

import pytest

from tests.reliability.jobs import TRAIN, exact_losses, run_job

LOGGED = re.compile(r"iteration\s+(\d+)/.*?learning rate: (\S+) \|.*?"
                    r"number of skipped iterations:\s+(\d+) \|")


@pytest.mark.distributed
def test_nan_loss_stops_naming_the_iteration():
    status, output = run_job(TRAIN + ["--train-iters", "4"], 1, fault="nan_loss:3")
    assert status != 0
    assert ("NonFiniteError: iteration 3: non-finite loss (NaN/inf) on ranks [0] and non-finite "
            "gradients (NaN/inf) on ranks [0]; stopping") in output, output[-4000:]
    assert sorted(exact_losses(output)) == [1, 2]


@pytest.mark.distributed
def test_nonfinite_updates_are_skipped_on_every_rank():
    status, output = run_job(TRAIN + ["--train-iters", "6", "--on-nonfinite", "skip"], 2,
                             fault="nan_loss:3,inf_grad:5")
    assert status == 0, output[-4000:]
    assert ("iteration 3: non-finite loss (NaN/inf) on ranks [0] and non-finite gradients "
            "(NaN/inf) on ranks [0, 1]; update skipped") in output
    assert "iteration 5: non-finite gradients (NaN/inf) on ranks [0, 1]; update skipped" in output
    losses = {i: float.fromhex(v) for i, v in exact_losses(output).items()}
    assert math.isnan(losses[3])
    assert all(math.isfinite(loss) for i, loss in losses.items() if i != 3), losses
    logged = {int(i): (float(lr), int(skipped)) for i, lr, skipped in LOGGED.findall(output)}
    assert [logged[i][1] for i in range(1, 7)] == [0, 0, 1, 0, 1, 0]
    lr = {i: value for i, (value, _) in logged.items()}
    assert lr[3] == lr[2] and lr[5] == lr[4]  # no scheduler step on a skipped update
    assert lr[2] > lr[4] > lr[6]
