"""``python -m megatron_patch.launch FAMILY MODE [positional settings] [Megatron flags]``.

Used by ``examples/<family>/run_*_mcore_<family>.sh``. ``DRY_RUN=1`` prints the commands instead of
running them. The training output is shown and also written to ``OUTPUT_BASEPATH/log/``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

from megatron_patch.launch.command import ENTRY_POINTS, Launch, compose
from megatron_patch.launch.settings import LaunchError, parse_positional
from megatron_patch.runtime.backends import available_backends


def _show(command: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command)])


def _run_logged(launch: Launch) -> int:
    """Run the training command, streaming its output to the terminal and the log file."""
    launch.log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(launch.log_file, "a") as log, subprocess.Popen(
        launch.train, env={**os.environ, **launch.env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    ) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        return process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Compose and run (or print, with ``DRY_RUN=1``) one launch."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[1] not in ENTRY_POINTS:
        print(f"usage: python -m megatron_patch.launch FAMILY {{{','.join(ENTRY_POINTS)}}} "
              "[ENV MODEL_SIZE ...] [--megatron-flag ...]", file=sys.stderr)
        return 2
    family, mode = argv[:2]
    try:
        settings, extra = parse_positional(argv[2:], mode)
        launch = compose(family, mode, settings, extra, available_backends())
    except (LaunchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in launch.notes:
        print(f"note: {note}")
    if os.environ.get("DRY_RUN", "0") not in ("0", ""):
        for command in [*launch.prepare, launch.train]:
            print(_show(command, launch.env))
        return 0
    for command in launch.prepare:
        subprocess.run(command, env={**os.environ, **launch.env}, check=True)
    print(f"run {launch.name}\n  log: {launch.log_file}", flush=True)
    return _run_logged(launch)


if __name__ == "__main__":
    sys.exit(main())
