"""``megatron-patch eval``: benchmark scores of a Megatron checkpoint with lm-evaluation-harness.

    megatron-patch eval --load M --tasks T1,T2 [--include-path DIR ...] [--num-fewshot K]
        [--batch-size B] [--limit N] [--output-path OUT [--log-samples]]
        [--apply-chat-template [NAME]] [--gen-kwargs k=v,...] [--seed S] [--max-length L]
        [--tp N] [--pp N] [--dtype auto|fp32|bf16|fp16] [Megatron flags ...]

Flags are named as ``lm_eval``'s. Tasks are lm-eval's YAML tasks: those of ``--include-path``
directories, the demo tasks shipped in ``megatron_patch/assets/eval_tasks`` (``tiny_mc``,
``tiny_gen``, ``tiny_ppl``) and lm-eval's own. Nothing is downloaded: the Hugging Face hub is
offline (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` default to 1), so a task whose data is
neither local nor in the datasets cache fails, saying so. Prints lm-eval's results table;
``--output-path`` writes lm-eval's results JSON (and with ``--log-samples`` its per-sample
JSONL) through lm-eval's ``EvaluationTracker``. With ``tp * pp > 1`` it relaunches itself under
torchrun with that many processes; every rank runs the same requests, rank 0 reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_patch.data.bad_records import DataError
from megatron_patch.generation.model import add_model_options, is_rank0, run_cli

MODULE = "megatron_patch.evaluation.cli_eval"
PROG = "megatron-patch eval"
SHIPPED_TASKS = Path(__file__).resolve().parent.parent / "assets" / "eval_tasks"
INSTALL_HINT = "pip install megatron-patch[eval]"
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Benchmark a Megatron checkpoint "
                                     "with EleutherAI's lm-evaluation-harness.")
    add_model_options(parser)
    parser.add_argument("--tasks", required=True,
                        help="comma-separated lm-eval task, group or tag names (globs allowed)")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="directory of lm-eval YAML tasks (repeatable)")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    parser.add_argument("--limit", type=float, default=None,
                        help="examples per task (a fraction if below 1); for testing only")
    parser.add_argument("--output-path", default=None,
                        help="directory (or .json file) for lm-eval's results JSON")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write every sample's inputs and outputs (needs --output-path)")
    parser.add_argument("--apply-chat-template", nargs="?", const=True, default=False,
                        metavar="NAME", help="render prompts with the tokenizer's chat template")
    parser.add_argument("--fewshot-as-multiturn", action=argparse.BooleanOptionalAction,
                        default=None, help="few-shot examples as chat turns (default: with "
                                           "--apply-chat-template)")
    parser.add_argument("--gen-kwargs", default=None,
                        help="generation settings for generate_until tasks, e.g. "
                             "max_gen_toks=64,do_sample=True,temperature=0.7")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of Python, numpy, torch, the few-shot sampler and sampling "
                             "(default: lm-eval's 0,1234,1234,1234)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens of context (default: max_position_embeddings)")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="bootstrap iterations of standard errors (0: none)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def load_tasks(names: list[str], include_paths: Sequence[str]) -> tuple[Any, list]:
    """lm-eval's ``TaskManager`` and the tasks and groups named by ``names`` (globs allowed),
    their data loaded: from the include paths, the shipped tasks and lm-eval's own (indexed
    only when a name is not found in the former: that takes seconds)."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include-path {path}: no such directory")
    paths = [str(SHIPPED_TASKS), *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(not manager.match_tasks([name]) for name in names):
        manager = TaskManager(include_path=paths)
    missing = [name for name in names if not manager.match_tasks([name])]
    if missing:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(missing)} (neither lm-eval's, "
                         f"the shipped {SHIPPED_TASKS.name} nor in --include-path)")
    built = []
    try:
        for name in manager.match_tasks(names):
            loaded = manager.load([name])
            built += ([loaded["groups"][name]] if name in loaded["groups"]
                      else list(loaded["tasks"].values()))
    except ConnectionError as error:
        raise DataError(f"a task's data is not available offline ({error}); nothing is "
                        "downloaded at run time: use a task over local files (--include-path) "
                        "or fill the Hugging Face datasets cache first (for instance with "
                        "lm_eval once online)") from None
    return manager, built


def _table(results: dict, column: str) -> str:
    """lm-eval's table of ``results[column]``; their JSON where lm-eval's table writer
    (pytablewriter, absent from a ``pip install --no-deps lm-eval``) cannot be imported."""
    from lm_eval.utils import make_table

    try:
        return make_table(results, column)
    except ModuleNotFoundError as error:
        log.warning("lm-eval's results table needs %s (%s): printing the %s as JSON",
                    error.name, INSTALL_HINT, column)
        return json.dumps(results[column], indent=2, default=str)


def _save(tracker, results: dict, log_samples: bool) -> Path:
    """Write lm-eval's results (and samples) files; the results file's path."""
    samples = results.pop("samples", None) if log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    path = Path(tracker.output_path)
    directory = path.parent if path.suffix == ".json" else (
        path / str(tracker.general_config_tracker.model_name_sanitized))
    stem = f"{path.stem}_" if path.suffix == ".json" else "results_"
    written = directory / f"{stem}{getattr(tracker, 'date_id', '')}.json"
    if not written.is_file():  # EvaluationTracker logs write errors instead of raising them
        raise OSError(f"--output-path {tracker.output_path}: lm-eval could not write the "
                      "results there (see its warning above)")
    if samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return written


def run(options: argparse.Namespace, extra: Sequence[str]) -> int:
    """Evaluate on this rank (inside an initialised world of ``tp * pp`` ranks)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import simple_parse_args_string

    from megatron_patch.evaluation.harness_lm import MegatronLM
    from megatron_patch.generation.model import (
        args_from_options,
        load_inference_model,
        load_tokenizer,
    )

    if options.log_samples and not options.output_path:
        raise ValueError("--log-samples needs --output-path")
    if not is_rank0():
        import datasets

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        datasets.disable_progress_bars()
    manager, tasks = load_tasks([name for name in options.tasks.split(",") if name],
                       options.include_path)
    args = args_from_options(options, extra, seq_length=options.max_length,
                             micro_batch_size=options.batch_size)
    loaded = load_inference_model(args, load_tokenizer(args))
    lm = MegatronLM(loaded, batch_size=options.batch_size, max_length=options.max_length,
                    seed=1234 if options.seed is None else options.seed,
                    progress=options.progress and is_rank0())
    seeds = {} if options.seed is None else {
        key: options.seed for key in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                      "fewshot_random_seed")}
    tracker = EvaluationTracker(output_path=options.output_path)
    multiturn = (bool(options.apply_chat_template) if options.fewshot_as_multiturn is None
                 else options.fewshot_as_multiturn)
    results = simple_evaluate(
        model=lm, model_args={"model": str(options.load), "tp": options.tp, "pp": options.pp,
                              "dtype": options.dtype},
        tasks=tasks, num_fewshot=options.num_fewshot, batch_size=options.batch_size,
        limit=int(options.limit) if options.limit and options.limit >= 1 else options.limit,
        log_samples=options.log_samples, evaluation_tracker=tracker,
        apply_chat_template=options.apply_chat_template, fewshot_as_multiturn=multiturn,
        gen_kwargs=simple_parse_args_string(options.gen_kwargs) if options.gen_kwargs else None,
        task_manager=manager, bootstrap_iters=options.bootstrap_iters, **seeds)
    if results is not None and is_rank0():
        written = _save(tracker, results, options.log_samples) if options.output_path else None
        for column in ("results", "groups"):
            if column in results:
                print(_table(results, column), flush=True)
        if written is not None:
            print(f"wrote {written}", flush=True)
    torch.distributed.barrier()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch eval ...``; returns the exit status."""
    if importlib.util.find_spec("lm_eval") is None:
        print(f"{PROG}: error: lm-evaluation-harness is not installed; install it with "
              f"`{INSTALL_HINT}` (or `pip install lm-eval`)", file=sys.stderr)
        return 1
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(variable, "1")
    return run_cli(PROG, MODULE, _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
