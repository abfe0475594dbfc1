"""``python -m megatron_patch.launch FAMILY SCRIPT [positions] [named flags] [Megatron flags]``.

``SCRIPT`` is ``pretrain`` or ``finetune`` (Pai's original 22 positions, used by
``examples/<family>/run_{pretrain,finetune}_mcore_<family>.sh``) or ``mcore`` (the 25/27 positions
of Pai's ``run_mcore_*.sh``; ``MODE=pretrain|sft``, the SFT position or ``--mode`` choose the
entry point; used by ``examples/<family>/run_mcore_<family>.sh``). ``DRY_RUN=1`` prints the
commands instead of running them. Missing inputs stop the launch before torchrun starts
(:mod:`megatron_patch.launch.preflight`), and a run that already reached its last iteration
says so. The terminal shows Megatron's iteration, validation and checkpoint lines
(:mod:`megatron_patch.launch.console`); the whole output goes to the run's log file
(``OUTPUT_BASEPATH/log/``, or ``log/`` of a ``--save`` directory).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from megatron_patch.launch.command import Launch, compose
from megatron_patch.launch.console import ConsoleFilter, backends_line
from megatron_patch.launch.model_sizes import family_sizes
from megatron_patch.launch.preflight import finished_iteration
from megatron_patch.launch.settings import LaunchError, parse_launch
from megatron_patch.runtime.backends import available_backends

SCRIPTS = ("pretrain", "finetune", "mcore")


def layout_for(family: str, script: str) -> str:
    """The positional order of a launcher script (Pai's, per script and family kind)."""
    if script != "mcore":
        return "pai"
    return "mcore-moe" if any(m.is_moe for m in family_sizes(family)) else "mcore"


_PLACEHOLDER = re.compile(r"[\w@%+=:,./-]*\$\{\w+\}[\w@%+=:,./${}-]*")


def _quote(word: str) -> str:
    """Shell quoting that leaves ``${VAR}`` placeholders for the job's shell to expand."""
    return f'"{word}"' if _PLACEHOLDER.fullmatch(word) else shlex.quote(word)


def _show(command: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={_quote(v)}" for k, v in env.items()), *map(_quote, command)])


def _run_logged(launch: Launch) -> int:
    """Run the training command: every line to the log file, the informative ones
    (:class:`ConsoleFilter`) also to the terminal."""
    launch.log_file.parent.mkdir(parents=True, exist_ok=True)
    console = ConsoleFilter()
    with open(launch.log_file, "a") as log, subprocess.Popen(
        launch.train, env={**os.environ, **launch.env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    ) as process:
        for line in process.stdout:
            if console.shows(line):
                sys.stdout.write(line)
            log.write(line)
        status = process.wait()
    if status:
        print(f"training failed (exit status {status}); the full output is in {launch.log_file}",
              file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Compose and run (or print, with ``DRY_RUN=1``) one launch."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[1] not in SCRIPTS:
        print(f"usage: python -m megatron_patch.launch FAMILY {{{','.join(SCRIPTS)}}} "
              "[ENV MODEL_SIZE ...] [--model-size 8B --tp 2 ...] [--megatron-flag ...]",
              file=sys.stderr)
        return 2
    family, script = argv[:2]
    dry_run = os.environ.get("DRY_RUN", "0") not in ("0", "")
    try:
        parsed = parse_launch(argv[2:], layout_for(family, script),
                              None if script == "mcore" else script)
        launch = compose(family, parsed.mode, parsed.settings, parsed.extra,
                         available_backends(), dry_run)
    except (LaunchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if launch.problems and not dry_run:
        for problem in launch.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for note in launch.notes:
        print(f"note: {note}")
    if dry_run:
        for problem in launch.problems:
            print(f"note: {problem} (not found on this machine)")
        for command in [*launch.prepare, launch.train]:
            print(_show(command, launch.env))
        return 0
    done = finished_iteration(launch.save_dir, launch.train_iters)
    if done is not None:
        print(f"training is complete: {launch.save_dir} holds iteration {done} of "
              f"{launch.train_iters}. To train further, raise --train-iters (or TRAIN_TOKENS); "
              "to start a new run, use another --save (or OUTPUT_BASEPATH)")
        return 0
    for command in launch.prepare:
        subprocess.run(command, env={**os.environ, **launch.env}, check=True)
    print(f"run {launch.name}\n  log: {launch.log_file}\n  {backends_line(available_backends())}",
          flush=True)
    return _run_logged(launch)


if __name__ == "__main__":
    sys.exit(main())
