"""One benchmark engine in a fresh one-rank process, its result read from a ``RESULT`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron_patch.utils.torchrun import free_port


def spawn_worker(module: str, engine: str, flags: list[str], echo: str | None = None) -> dict:
    """``python -m module --worker engine flags`` in a one-rank world; the JSON of its
    ``RESULT`` line, or ``{"failed": "out of memory" | "failed"}`` with its output on stderr.
    Output lines starting with ``echo`` are printed, prefixed by the engine."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", module, "--worker", engine, *flags],
                          capture_output=True, text=True, env=env)
    lines = proc.stdout.splitlines()
    for line in lines:
        if echo and line.startswith(echo):
            print(f"{engine}: {line[len(echo):]}")
    results = [line for line in lines if line.startswith("RESULT ")]
    if proc.returncode or not results:
        output = proc.stdout + proc.stderr
        print(f"{engine} failed ({proc.returncode}):\n{output[-4000:]}", file=sys.stderr)
        return {"failed": "out of memory" if "OutOfMemoryError" in output else "failed"}
    return json.loads(results[-1][len("RESULT "):])
