"""Benchmark ``megatron-patch preprocess`` against Megatron-LM's ``tools/preprocess_data.py``.

    python toolkits/benchmark/bench_preprocess.py --megatron-lm /path/to/Megatron-LM
        [--input corpus.jsonl] [--repeat 10] [--workers 1 2] [--runs 3]
        [--tokenizer-type HFTokenizer|TinyTokenizer] [--tokenizer-path DIR] [--workdir DIR]
        [--max-load 1.5] [--ours-args '--chunk-size 32'] [--megatron-args '...']

Both tools tokenize the same JSONL with the same Hugging Face tokenizer (Megatron-LM's side is
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``), the same ``--workers`` and
``--append-eod``, each run in a fresh process, the runs of the two tools interleaved so that a
change in machine load hits both alike. Reported per tool and worker count: the median, min and
max wall time over ``--runs`` runs, tokens/s including process start-up (total tokens / median
wall time), the median start-up time (wall time on a one-document input: an empty input is an
error for ``megatron-patch``), tokens/s excluding it (tokens / (wall - start-up)), the same for
CPU time (user + system of the process and its workers: much less sensitive than wall time to
other load on a shared machine), the 1-minute load average before and after the runs, and whether
every run's ``.bin``/``.idx`` is byte-identical to the first run of ``megatron-patch``. With
``--max-load`` each timed run first waits for the load average to drop below that.

Megatron-LM is never imported here or copied into this repository: its script runs from the
checkout given with ``--megatron-lm`` (get one with ``git clone`` or a worktree), with
``PYTHONPATH`` set to that checkout so that its ``megatron`` package (``megatron.training`` is not
in the megatron-core wheel) shadows the installed megatron-core; ``megatron-patch`` runs with the
installed one. Both versions are printed. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CORPUS = REPO / "megatron_patch" / "assets" / "tiny_corpus.jsonl"
TINY_TOKENIZER = REPO / "megatron_patch" / "assets" / "tiny_tokenizer"
TOOLS = ("megatron-patch", "Megatron-LM")
# Megatron indexed-dataset dtype codes (megatron.core.datasets.indexed_dataset.DType) -> bytes
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
IDX_HEADER = b"MMIDIDX\x00\x00"


@dataclass
class Series:
    """The timed runs of one tool at one worker count."""

    tool: str
    workers: int
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    startups: list[float] = field(default_factory=list)
    startup_cpus: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)


def dataset_tokens(prefix: Path) -> int:
    """Number of tokens in the indexed dataset ``prefix`` (``.bin`` size / token size)."""
    header = Path(f"{prefix}.idx").read_bytes()[:len(IDX_HEADER) + 9]
    if not header.startswith(IDX_HEADER):
        raise ValueError(f"{prefix}.idx is not a Megatron index file")
    itemsize = DTYPE_SIZES[header[len(IDX_HEADER) + 8]]
    return Path(f"{prefix}.bin").stat().st_size // itemsize


def same_dataset(prefix: Path, reference: Path) -> bool:
    """Whether ``prefix``'s ``.bin`` and ``.idx`` are byte-identical to ``reference``'s."""
    return all(filecmp.cmp(f"{prefix}{suffix}", f"{reference}{suffix}", shallow=False)
               for suffix in (".bin", ".idx"))


def remove_dataset(prefix: Path) -> None:
    """Delete ``{prefix}.bin`` and ``{prefix}.idx`` if present."""
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)


def build_input(source: Path, repeat: int, target: Path) -> Path:
    """``source`` repeated ``repeat`` times at ``target`` (``source`` itself if ``repeat`` is 1)."""
    if repeat == 1:
        return source
    data = source.read_bytes()
    if data and not data.endswith(b"\n"):
        data += b"\n"
    with open(target, "wb") as out:
        for _ in range(repeat):
            out.write(data)
    return target


def first_document(source: Path, target: Path) -> Path:
    """A one-document JSONL (the first non-blank line of ``source``), to time start-up."""
    with open(source, "rb") as lines:
        line = next(line for line in lines if line.strip())
    target.write_bytes(line if line.endswith(b"\n") else line + b"\n")
    return target


class Runner:
    """Builds and runs the command line of each tool, each in a fresh process."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.megatron_lm = args.megatron_lm.resolve()
        self.script = self.megatron_lm / "tools" / "preprocess_data.py"
        if not self.script.is_file():
            raise SystemExit(f"--megatron-lm {args.megatron_lm}: no tools/preprocess_data.py")
        base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        # megatron-patch from this repository with the installed megatron-core; Megatron-LM's
        # script with its checkout's megatron package first on the path.
        self.env = {TOOLS[0]: {**base, "PYTHONPATH": str(REPO)},
                    TOOLS[1]: {**base, "PYTHONPATH": str(self.megatron_lm)}}
        self.tokenizer_dir = (TINY_TOKENIZER if args.tokenizer_type == "TinyTokenizer"
                              else args.tokenizer_path.resolve())

    def command(self, tool: str, source: Path, prefix: Path, workers: int) -> list[str]:
        """The command line of ``tool`` writing ``{prefix}_text_document.bin/.idx``."""
        common = ["--input", str(source), "--output-prefix", str(prefix),
                  "--workers", str(workers), "--append-eod"]
        if tool == TOOLS[0]:
            tokenizer = ["--tokenizer-type", self.args.tokenizer_type]
            if self.args.tokenizer_type != "TinyTokenizer":
                tokenizer += ["--tokenizer-path", str(self.tokenizer_dir)]
            return [self.args.python, "-m", "megatron_patch.cli", "preprocess", *common,
                    *tokenizer, *shlex.split(self.args.ours_args)]
        return [self.args.python, str(self.script), *common,
                "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", str(self.tokenizer_dir),
                *shlex.split(self.args.megatron_args)]

    def run(self, tool: str, source: Path, prefix: Path, workers: int) -> tuple[float, float]:
        """Run ``tool`` once; returns its wall and CPU (user + system) seconds, start-up included.

        The CPU time is that of the process and of its worker processes (reaped descendants are
        added to ``RUSAGE_CHILDREN``); unlike the wall time, other load on the machine hardly
        changes it.
        """
        command = self.command(tool, source, prefix, workers)
        log = self.workdir / "last_run.log"
        with open(log, "wb") as out:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            status = subprocess.run(command, cwd=REPO, env=self.env[tool], stdout=out,
                                    stderr=subprocess.STDOUT, check=False).returncode
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if status != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"{tool} failed (exit {status}): {shlex.join(command)}\n{tail}")
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return wall, cpu

    def megatron_version(self, tool: str) -> str:
        """Version and location of the ``megatron.core`` that ``tool`` imports."""
        probe = ("import importlib.util as u; s = u.find_spec('megatron'); "
                 "print(list(s.submodule_search_locations)[0])")
        found = subprocess.run([self.args.python, "-c", probe], cwd=REPO, env=self.env[tool],
                               capture_output=True, text=True, check=False)
        if found.returncode != 0:
            return "not found"
        location = Path(found.stdout.strip())
        try:
            info = (location / "core" / "package_info.py").read_text()
        except OSError:
            return f"? ({location})"
        parts = [re.search(rf"^{name} = (\S+)", info, re.M) for name in ("MAJOR", "MINOR",
                                                                           "PATCH")]
        version = ".".join(part.group(1).strip("'\"") if part else "?" for part in parts)
        return f"{version} ({location})"


def megatron_lm_commit(directory: Path) -> str:
    """The checked-out commit of the Megatron-LM checkout (with ``+dirty`` if modified)."""
    head = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True, check=False)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_load(limit: float | None, patience: float) -> None:
    """Wait (at most ``patience`` seconds) until the 1-minute load average is below ``limit``."""
    if limit is None:
        return
    deadline = time.monotonic() + patience
    while load_average() >= limit and time.monotonic() < deadline:
        time.sleep(5)


def benchmark(runner: Runner, source: Path, workdir: Path) -> tuple[list[Series], int]:
    """Time both tools on ``source`` at each worker count; returns the series and token count."""
    args = runner.args
    one_doc = first_document(source, workdir / "one_document.jsonl")
    reference = workdir / "reference_text_document"
    remove_dataset(reference)  # a --workdir may hold one from an earlier benchmark
    tokens = 0
    results: list[Series] = []
    for workers in args.workers:
        series = {tool: Series(tool, workers) for tool in TOOLS}
        for run in range(args.runs):
            # alternate which tool goes first, so that neither always follows the other
            for tool in TOOLS if run % 2 == 0 else TOOLS[::-1]:
                name = f"{tool}_w{workers}_r{run}".replace("-", "_")
                wait_for_load(args.max_load, args.max_wait)
                load = load_average()
                wall, cpu = runner.run(tool, source, workdir / name, workers)
                series[tool].walls.append(wall)
                series[tool].cpus.append(cpu)
                series[tool].loads += [load, load_average()]
                prefix = workdir / f"{name}_text_document"
                if not Path(f"{reference}.bin").exists():
                    for suffix in (".bin", ".idx"):
                        shutil.copyfile(f"{prefix}{suffix}", f"{reference}{suffix}")
                    tokens = dataset_tokens(reference)
                series[tool].identical.append(same_dataset(prefix, reference))
                remove_dataset(prefix)
                wall, cpu = runner.run(tool, one_doc, workdir / f"{name}_startup", workers)
                series[tool].startups.append(wall)
                series[tool].startup_cpus.append(cpu)
                remove_dataset(workdir / f"{name}_startup_text_document")
                print(f"  {tool:<14} workers={workers} run {run + 1}/{args.runs}: "
                      f"{series[tool].walls[-1]:6.2f}s wall {series[tool].cpus[-1]:6.2f}s CPU "
                      f"(start-up {series[tool].startups[-1]:.2f}s wall "
                      f"{series[tool].startup_cpus[-1]:.2f}s CPU, load "
                      f"{series[tool].loads[-2]:.2f}->{series[tool].loads[-1]:.2f})", flush=True)
        results.extend(series.values())
    return results, tokens


def _rate(tokens: int, seconds: float) -> str:
    """``tokens / seconds`` with thousands separators ("n/a" when not positive)."""
    return f"{tokens / seconds:,.0f}" if seconds > 0 else "n/a"


def print_table(results: list[Series], tokens: int) -> None:
    """One row per tool and worker count (medians over the runs)."""
    header = (f"{'tool':<14} {'workers':>7} {'wall s':>6} {'min':>6} {'max':>6} "
              f"{'tok/s':>9} {'start-up':>8} {'tok/s':>9} {'CPU s':>6} {'start-up':>8} "
              f"{'tok/CPU-s':>9} {'load 1m':>11} {'identical':>9}")
    under = (f"{'':<14} {'':>7} {'median':>6} {'':>6} {'':>6} {'all':>9} {'wall s':>8} "
             f"{'excl.':>9} {'median':>6} {'CPU s':>8} {'excl.':>9} {'min-max':>11} {'':>9}")
    print(header)
    print(under)
    print("-" * len(header))
    for series in results:
        wall = statistics.median(series.walls)
        startup = statistics.median(series.startups)
        cpu = statistics.median(series.cpus)
        startup_cpu = statistics.median(series.startup_cpus)
        loads = f"{min(series.loads):.2f}-{max(series.loads):.2f}"
        same = "yes" if all(series.identical) else "NO"
        print(f"{series.tool:<14} {series.workers:>7} {wall:>6.2f} {min(series.walls):>6.2f} "
              f"{max(series.walls):>6.2f} {_rate(tokens, wall):>9} {startup:>8.2f} "
              f"{_rate(tokens, wall - startup):>9} {cpu:>6.2f} {startup_cpu:>8.2f} "
              f"{_rate(tokens, cpu - startup_cpu):>9} {loads:>11} {same:>9}")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-lm", type=Path, required=True,
                        help="a Megatron-LM checkout (outside this repository)")
    parser.add_argument("--input", type=Path, default=SHIPPED_CORPUS,
                        help="JSONL with a 'text' key (default: the shipped tiny corpus)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="concatenate the input this many times (default: 10 for the "
                             "shipped corpus, 1 for --input)")
    parser.add_argument("--tokenizer-type", choices=["HFTokenizer", "TinyTokenizer"],
                        default="HFTokenizer")
    parser.add_argument("--tokenizer-path", type=Path, default=TINY_TOKENIZER,
                        help="Hugging Face tokenizer directory (default: the shipped one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per tool and workers")
    parser.add_argument("--python", default=sys.executable, help="interpreter for both tools")
    parser.add_argument("--ours-args", default="",
                        help="extra flags for megatron-patch preprocess (e.g. '--chunk-size 32')")
    parser.add_argument("--megatron-args", default="",
                        help="extra flags for Megatron-LM's preprocess_data.py")
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each timed run wait until the 1-minute load average is "
                             "below this (on a shared machine)")
    parser.add_argument("--max-wait", type=float, default=300,
                        help="longest wait for --max-load, in seconds; then run anyway")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch directory (default: a temporary one, removed at the end)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns 1 if the outputs differ."""
    args = build_parser().parse_args(argv)
    repeat = args.repeat or (10 if args.input == SHIPPED_CORPUS else 1)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        runner = Runner(args, workdir)
        source = build_input(args.input.resolve(), repeat, workdir / f"input_x{repeat}.jsonl")
        with open(source, "rb") as lines:
            documents = sum(1 for line in lines if line.strip())
        print(f"input: {args.input} x{repeat} -> {source.stat().st_size / 1e6:.1f} MB, "
              f"{documents} documents")
        print(f"tokenizer: {args.tokenizer_type} {runner.tokenizer_dir} "
              "(Megatron-LM: HuggingFaceTokenizer)")
        print(f"Megatron-LM: {runner.megatron_lm} @ {megatron_lm_commit(runner.megatron_lm)}")
        for tool in TOOLS:
            print(f"megatron.core used by {tool}: {runner.megatron_version(tool)}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
        print(f"python {platform.python_version()} ({args.python}), {cores} usable CPU cores, "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for tool in TOOLS:
            print(f"{tool}: {shlex.join(runner.command(tool, source, Path('PREFIX'), 0))}"
                  .replace("--workers 0", "--workers N"))
        results, tokens = benchmark(runner, source, workdir)
        print(f"\n{tokens:,} tokens (EOD included) per run. tok/s all = tokens / median wall "
              "time; start-up = the same command on a one-document input; excl. = tokens / "
              "(median - median start-up); CPU = user + system of the process and its workers")
        print_table(results, tokens)
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        identical = all(all(series.identical) for series in results)
        print("outputs: every run of both tools byte-identical (.bin and .idx)" if identical
              else "outputs: DIFFER (see the 'identical' column)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
