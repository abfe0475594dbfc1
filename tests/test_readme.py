"""README.md's commands, read from README.md itself and run as a user would, each in a fresh
process, in a scratch directory that mirrors the repository (outputs land in its ``output/``).

Which commands run is decided by the rules below (:func:`skip_reason`), never by a list of
lines, so a new README command runs unless a rule excludes it:

- ``bash scripts/setup.sh &&`` is dropped from a line: installing is what ``.ci/run`` does
  before the tests; the rest of the line runs; optional ``[...]`` arguments are left out, and
  ``output/checkpoint/<run>`` is the run the quick start trained (commands run in README order);
- not run: the test suite itself (``pytest``), GPU-only or cluster work (``torchrun
  --nproc-per-node 8``, ``tests/gpu/``, benchmarks), commands that rewrite the repository's
  ``cards/`` (``tests/conversion/test_cards.py`` regenerates them), demos another test runs
  (:data:`RUN_ELSEWHERE`), and commands with placeholders: a one-letter argument (``H``,
  ``M``), ``<...>``, ``...``, an absent absolute path (``/models/...``), an absent model
  directory (``--hf-dir Qwen2.5-7B``) or relative input file (``output/`` and ``.venv/`` are
  the scratch directory's own) — except with ``DRY_RUN=1``, where the
  launcher only prints the command (and must succeed);
- a ```` ``` ```` block of ``$ command`` lines runs each command and requires every output line
  README shows (up to a ``...``) in its output.

Printed results are checked against README: the quick start's logged losses (the digits README
gives before ``...``, within one unit of their last place), its checkpoints, validation and
TensorBoard logs, and that running it again says the run is complete.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch import REPO, free_port

README = (REPO / "README.md").read_text()
DROPPED = ("bash scripts/setup.sh && ",)
OPTIONAL = re.compile(r"\s\[[^\]]*\]")  # ``[--dtype bf16]``: an optional argument, left out
QUICK_START_RUN = "output/checkpoint/<run>"  # the run the quick start trained (runs first)
NOT_RUN = [
    (re.compile(r"(^|\s)(-m )?pytest\b"), "the test suite itself"),
    (re.compile(r"torchrun --nproc-per-node 8"), "needs 8 processes of a cluster"),
    (re.compile(r"tests/gpu/|toolkits[./]benchmark"), "a GPU benchmark or check"),
    (re.compile(r"--out-dir cards\b|--index cards/"),
     "rewrites the repository's cards/ (tests/conversion/test_cards.py regenerates them)"),
]
# Demo launchers that another test already runs (same script, shorter run).
RUN_ELSEWHERE = {
    "examples/llama/run_finetune_mcore_llama.sh": "tests/test_finetune.py",
    "examples/llava/run_mcore_llava.sh": "tests/vlm/test_llava_training.py",
    "examples/qwen2_5_vl/run_mcore_qwen2_5_vl.sh": "tests/vlm/test_qwen2_vl_training.py",
}
OUTPUT_FLAGS = ("--out", "--output", "--output-prefix", "--out-dir", "--index", "--plot")
MODEL_DIR_FLAGS = ("--hf-dir", "--mcore-dir", "--hf-template", "--load")
LOSS = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: (\d+\.\d+)(?:\.\.\.)?E\+00")
MAIN_JOB = "bash examples/llama/run_pretrain_mcore_llama.sh"


@dataclass(frozen=True)
class Command:
    """One README command line (continuations joined), where it is, and what README shows."""

    line: int
    text: str
    shown: tuple[str, ...] = ()  # output lines README shows for a ``$ command``


def readme_commands() -> list[Command]:
    """Every command of README.md's ```bash blocks and ``$ `` lines of plain blocks."""
    commands = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M):
        language, body = match.group(1), match.group(2)
        first = README.count("\n", 0, match.start(2)) + 1
        if language == "bash":
            joined = re.sub(r"\\\n\s*", " ", body)
            offsets = [first + i for i, line in enumerate(body.splitlines())
                       if not (i and body.splitlines()[i - 1].endswith("\\"))]
            for number, text in zip(offsets, joined.splitlines()):
                if text.strip() and not text.lstrip().startswith("#"):
                    commands.append(Command(number, text.strip()))
        elif language == "":
            lines = body.splitlines()
            for i, text in enumerate(lines):
                if text.startswith("$ "):
                    shown = []
                    for out in lines[i + 1:]:
                        if out.startswith("$ "):
                            break
                        shown.append(out)
                    commands.append(Command(first + i, text[2:], tuple(shown)))
    return commands


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return text.split()


def _missing_input(words: list[str]) -> str | None:
    """The first placeholder or absent input path among ``words`` (None: all present)."""
    previous = ""
    for word in words:
        value = word.split("=", 1)[1] if re.match(r"^[A-Z_]+=", word) else word
        output, model_dir = previous in OUTPUT_FLAGS, previous in MODEL_DIR_FLAGS
        previous = word
        if output or value.startswith("-") or value in ("&&", "|", "||", ";"):
            continue
        if re.fullmatch(r"[A-Z]", value) or "<" in value or value == "...":
            return value
        if value.startswith("/") and not Path(value).exists():
            return value
        looks_like_path = "/" in value or re.search(r"\.(jsonl|json|txt|png)$", value)
        if looks_like_path and not value.startswith(("/", ".venv/", "output/")) and not any(
                (REPO / value).parent.glob((REPO / value).name)):
            return value
        if model_dir and not value.startswith("output/") and not (REPO / value).exists():
            return value  # a model directory such as Qwen2.5-7B
    return None


def skip_reason(command: Command) -> str | None:
    """Why ``command`` is not run on a CPU (None: it runs)."""
    text = OPTIONAL.sub("", command.text).replace(QUICK_START_RUN, "output/checkpoint")
    for pattern, reason in NOT_RUN:
        if pattern.search(text):
            return reason
    missing = None if "DRY_RUN=1" in text else _missing_input(_words(text))
    if missing:
        return f"placeholder or absent input {missing!r}"
    for script, test in RUN_ELSEWHERE.items():
        if re.search(rf"(^|\s)bash {re.escape(script)}(\s|$)", text):
            return f"a demo that {test} runs"
    return None


def _runnable(command: Command, scratch: Path) -> str:
    text = OPTIONAL.sub("", command.text)
    if QUICK_START_RUN in text:
        if not (scratch / "output" / "checkpoint").is_dir():
            pytest.skip("needs the quick start's run (the README test runs in README order)")
        (run,) = (scratch / "output" / "checkpoint").iterdir()
        text = text.replace(QUICK_START_RUN, str(run.relative_to(scratch)))
    for dropped in DROPPED:
        text = text.replace(dropped, "")
    return text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory that mirrors the repository (symlinks) with its own ``output/`` and a
    ``.venv`` that is this interpreter's environment."""
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".venv", "output"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


def run_in(scratch: Path, text: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """``text`` in a fresh bash in ``scratch``, with this checkout on PYTHONPATH."""
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("DRY_RUN", None)
    return subprocess.run(["bash", "-c", text], cwd=scratch, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check_shown(command: Command, output: str) -> None:
    for line in command.shown:
        expected = line.split("...")[0].rstrip() if "..." in line else line
        assert expected in output, f"README line {command.line}: {line!r} not in:\n{output}"


def _readme_losses() -> dict[int, str]:
    """The quick start's logged losses as README shows them: iteration -> leading digits."""
    return {int(m.group(1)): m.group(3) for m in LOSS.finditer(README)
            if int(m.group(2)) == 200}


def _check_main_job(scratch: Path, output: str) -> None:
    """The quick start's claims: losses, validation, checkpoints at 100 and 200, TensorBoard."""
    logged = {int(m.group(1)): m.group(3) for m in LOSS.finditer(output)}
    shown = _readme_losses()
    assert shown, "README shows no quick-start losses"
    for iteration, digits in shown.items():
        # README's digits hold up to one unit of their last place (CPUs differ in rounding)
        unit = 10.0 ** -len(digits.partition(".")[2])
        assert iteration in logged and abs(float(logged[iteration]) - float(digits)) <= unit, (
            f"README shows lm loss {digits}... at iteration {iteration}; the run logged "
            f"{logged.get(iteration)}")
    assert "validation loss at iteration 200" in output
    (run,) = (scratch / "output" / "checkpoint").iterdir()
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "200"
    assert (run / "iter_0000100").is_dir() and (run / "iter_0000200").is_dir()
    assert any((scratch / "output" / "tensorboard" / run.name).glob("events.out.tfevents.*"))
    assert "lm loss" in (scratch / "output" / "log" / f"{run.name}.log").read_text()
    assert len(output.splitlines()) < 120, "the terminal shows more than the informative lines"


COMMANDS = readme_commands()


def test_readme_has_the_commands_this_test_checks():
    """The rules keep the quick start, the DRY_RUN examples and `plan` running."""
    runnable = [c.text for c in COMMANDS if skip_reason(c) is None]
    assert any(MAIN_JOB in text for text in runnable)
    assert sum("DRY_RUN=1" in text for text in runnable) >= 2
    assert any(text.startswith("megatron-patch plan") for text in runnable)


@pytest.mark.distributed
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"line{c.line}")
def test_readme_command(command: Command, scratch: Path):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    result = run_in(scratch, _runnable(command, scratch))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"README line {command.line} failed:\n{output[-4000:]}"
    _check_shown(command, output)
    if MAIN_JOB in command.text and "DRY_RUN=1" not in command.text:
        _check_main_job(scratch, result.stdout)
        again = run_in(scratch, _runnable(command, scratch))
        assert again.returncode == 0 and "training is complete" in again.stdout, again.stdout
    if "convert mcore-to-hf" in command.text:  # "HF safetensors + config + tokenizer"
        words = _words(_runnable(command, scratch))
        out = scratch / words[words.index("--out") + 1]
        assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
        assert (out / "tokenizer.json").is_file(), sorted(p.name for p in out.iterdir())
