"""Killed, interrupted and failing runs resume bit-identically from their last complete checkpoint.

Real process trees (torchrun + 2 gloo ranks, CPU fp32): a chain of runs sharing one save
directory is SIGKILLed at a random moment, SIGKILLed between publishing a checkpoint and
updating the tracker, stopped with SIGTERM (``--exit-signal-handler``), then finished. Every
iteration any of them logs (training and validation loss, compared as ``float.hex``) equals the
uninterrupted reference run, and the tracker only ever names a checkpoint that passes the
load-time checks.
"""

import os
import random
import signal
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
from megatron.core import dist_checkpointing

from megatron_patch.training.checkpoint import check_checkpoint_before_load, iteration_dir
from tests.reliability.conftest import NPROC
from tests.reliability.jobs import (
    EXACT_VALID,
    TRAIN,
    Job,
    exact_losses,
    run_job,
    tracker,
)

SEED = int(os.environ.get("RELIABILITY_SEED", "0"))


def _same_as_reference(output: str, reference, what: str) -> list[int]:
    """Assert every loss ``output`` logs is the reference's; returns the iterations logged."""
    losses, valid = exact_losses(output), exact_losses(output, EXACT_VALID)
    for iteration, value in losses.items():
        assert value == reference.losses[iteration], (what, iteration, output[-4000:])
    for iteration, value in valid.items():
        assert value == reference.valid_losses[iteration], (what, "valid", iteration)
    return sorted(losses)


def _latest_is_loadable(save_dir: Path) -> int:
    """The tracker names a complete, loadable checkpoint (or none yet); returns its iteration."""
    latest = tracker(save_dir)
    if latest is None:
        return 0
    directory = iteration_dir(save_dir, int(latest))
    saved = dist_checkpointing.load_common_state_dict(str(directory))["args"]
    args = Namespace(**{**vars(saved), "load": str(save_dir), "ckpt_step": None})
    assert check_checkpoint_before_load(args) == directory
    return int(latest)


@pytest.mark.distributed
def test_kill_sigterm_and_resume_bit_identical(reference, tmp_path):
    rng = random.Random(SEED)
    save_dir = tmp_path / "ckpt"
    resume = TRAIN + ["--save", str(save_dir), "--load", str(save_dir)]
    logged: set[int] = set()

    # 1. SIGKILL of every process at a random moment (most likely inside the first save).
    job = Job(resume, NPROC)
    job.wait_for(r"^exact 1 ")
    delay = rng.uniform(0.0, 5.0)
    try:
        job.process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        job.signal(signal.SIGKILL, everyone=True)
    _, output = job.finish()
    logged |= set(_same_as_reference(output, reference, f"killed after {delay:.2f}s"))
    start = _latest_is_loadable(save_dir)
    assert start <= 6, f"the random kill ({delay:.2f}s) came too late: {output[-3000:]}"

    # 2. SIGKILL after iter_N is renamed into place, before the tracker names it.
    published = start + 2
    _, output = run_job(resume, NPROC, fault=f"published:{published}")
    logged |= set(_same_as_reference(output, reference, "killed while publishing"))
    assert _latest_is_loadable(save_dir) == start
    assert iteration_dir(save_dir, published).is_dir()  # complete but never the latest

    # 3. SIGTERM to the launcher at a random moment: a final checkpoint, then a clean exit.
    job = Job(resume + ["--exit-signal-handler"], NPROC)
    job.wait_for(rf"^exact {start + 1} ")
    try:
        job.process.wait(timeout=rng.uniform(0.0, 1.0))
    except subprocess.TimeoutExpired:
        job.signal(signal.SIGTERM, everyone=False)
    _, output = job.finish()
    stopped = _latest_is_loadable(save_dir)
    iterations = _same_as_reference(output, reference, "SIGTERM")
    logged |= set(iterations)
    assert iterations[-1] == stopped, output[-4000:]
    if stopped < 10:
        assert f"received SIGTERM at iteration {stopped}: saving a final checkpoint" in output

    # 4. Run to the end.
    status, output = run_job(resume, NPROC)
    assert status == 0, output[-4000:]
    iterations = _same_as_reference(output, reference, "finish")
    assert iterations == list(range(stopped + 1, 11))
    assert set(exact_losses(output, EXACT_VALID)) == {i for i in (2, 4, 6, 8, 10) if i > stopped}
    assert _latest_is_loadable(save_dir) == 10
    assert not (save_dir / ".saving").exists()
    print(f"SIGKILL after {delay:.2f}s -> resumed from {start}; killed while publishing "
          f"{published}; SIGTERM -> final checkpoint {stopped}; iterations logged {sorted(logged)}")


@pytest.mark.distributed
def test_failed_save_keeps_previous_checkpoint(tmp_path):
    """A save whose writes fail (as on a full disk) names the failure; iteration 2 stays latest."""
    save_dir = tmp_path / "ckpt"
    status, output = run_job(TRAIN + ["--save", str(save_dir)], 1, fault="disk_full:4")
    assert status != 0
    assert "saving the checkpoint of iteration 4 into" in output, output[-6000:]
    assert "No space left on device" in output
    assert f"the previous checkpoint ({save_dir / 'iter_0000002'}) is intact and still the " \
           "latest" in output
    assert tracker(save_dir) == "2"
    assert not (save_dir / ".saving").exists()
    assert not iteration_dir(save_dir, 4).exists()
    assert _latest_is_loadable(save_dir) == 2
