"""Single-node ``torch.distributed`` helpers: a free rendezvous port and torchrun relaunches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Where a relaunched rank 0 leaves its exit status: torchrun reports every non-zero exit of a
# rank as a crash, with its own traceback, so the ranks exit 0 and the relaunch returns this.
STATUS_FILE = "MEGATRON_PATCH_STATUS_FILE"


def free_port() -> int:
    """A port the OS reported free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch(module: str, argv: list[str], nproc: int) -> int:
    """Run ``python -m module argv`` under torchrun with ``nproc`` processes; its exit code,
    or the status rank 0 gave :func:`rank_exit_status`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="megatron-patch-") as scratch:
        status = Path(scratch) / "status"
        code = subprocess.run(command, env={**env, STATUS_FILE: str(status)}).returncode
        return int(status.read_text()) if code == 0 and status.is_file() else code


def rank_exit_status(status: int) -> int:
    """What a rank returns for exit ``status``: unchanged outside :func:`relaunch`; under it 0,
    rank 0's ``status`` going to the relaunching process (no torchrun failure report)."""
    path = os.environ.get(STATUS_FILE)
    if path is None:
        return status
    if int(os.environ.get("RANK", "0")) == 0:
        Path(path).write_text(str(status))
    return 0


def run_distributed(module: str, argv: list[str], nproc: int) -> int | None:
    """Relaunch ``python -m module argv`` under torchrun when this process is not part of a world
    of at least ``nproc`` ranks; returns its exit status, or None when already running in one.

    Outside torchrun (and with ``nproc == 1``) it sets up a one-process world's rendezvous.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) >= nproc:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        return None
    return relaunch(module, argv, nproc)
