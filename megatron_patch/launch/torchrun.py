"""Single-node ``torch.distributed`` helpers: a free rendezvous port and torchrun relaunches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A port the OS reported free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch(module: str, argv: list[str], nproc: int) -> int:
    """Run ``python -m module argv`` under torchrun with ``nproc`` processes; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode


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
