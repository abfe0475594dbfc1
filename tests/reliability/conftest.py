"""The reference run the reliability tests compare against, shared by its modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.jobs import EXACT_VALID, TRAIN, exact_losses, run_job

NPROC = 2  # data-parallel ranks of the reference run and of the runs compared with it


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its exact losses and its checkpoints (every 2 iterations)."""

    losses: dict[int, str]
    valid_losses: dict[int, str]
    save_dir: Path


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    save_dir = tmp_path_factory.mktemp("reference") / "ckpt"
    status, output = run_job(TRAIN + ["--save", str(save_dir)], NPROC)
    assert status == 0, output[-6000:]
    losses = exact_losses(output)
    assert sorted(losses) == list(range(1, 11)), output[-6000:]
    return Reference(losses, exact_losses(output, EXACT_VALID), save_dir)
