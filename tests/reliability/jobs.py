"""Training jobs as real process trees (torchrun + ranks) that tests can kill, signal and read."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.launch import MOCK_DATA, REPO, TINY_MODEL, free_port

EXACT = re.compile(r"^exact (\d+) (\S+)$", re.MULTILINE)
EXACT_VALID = re.compile(r"^exact-valid (\d+) (\S+)$", re.MULTILINE)
TRAIN = TINY_MODEL + MOCK_DATA + [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--seed", "5",
    "--train-iters", "10", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
    "--save-interval", "2", "--verify-integrity"]


class Job:
    """``tests.reliability.fault_worker`` under torchrun; its output is collected as it runs."""

    def __init__(self, args: list[str], nproc: int, fault: str = "") -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(free_port()), "-m", "tests.reliability.fault_worker",
                   *args]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "FAULT": fault}
        self.process = subprocess.Popen(command, cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        """Everything printed so far (stdout and stderr of every process)."""
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 600) -> None:
        """Block until a line matches ``pattern``; fail if the job ends or times out first."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while not regex.search(self.output):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r}:\n{self.output[-6000:]}")
            time.sleep(0.01)

    def signal(self, sig: signal.Signals, everyone: bool) -> None:
        """Send ``sig`` to the launcher, and with ``everyone`` to all its processes at once."""
        launcher = psutil.Process(self.process.pid)
        processes = [launcher, *launcher.children(recursive=True)] if everyone else [launcher]
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Wait for the job to end; returns (exit status, output)."""
        self.process.wait(timeout)
        self.reader.join(timeout)
        return self.process.returncode, self.output


def run_job(args: list[str], nproc: int, fault: str = "") -> tuple[int, str]:
    """Run a job to its end (or death); returns (exit status, output)."""
    return Job(args, nproc, fault).finish()


def exact_losses(output: str, pattern: re.Pattern = EXACT) -> dict[int, str]:
    """Iteration -> exactly printed loss (``float.hex``)."""
    return {int(i): value for i, value in pattern.findall(output)}


def tracker(directory: Path) -> str | None:
    """Content of ``latest_checkpointed_iteration.txt``, or None without one."""
    file = directory / "latest_checkpointed_iteration.txt"
    return file.read_text().strip() if file.is_file() else None
