"""``megatron-patch eval`` against lm-eval's own Hugging Face backend (``HFLM``), on the CPU.

Tiny random models (dense llama, MoE qwen3_moe) with the shipped tokenizer are converted to
Megatron checkpoints; the console command scores the shipped demo tasks (multiple choice,
generation, rolling perplexity) at TP1 and TP2 (torchrun, gloo), with few-shot contexts longer
than ``max_length`` (left truncation, several rolling windows) and, for one case, the chat
template. Every sample's log-likelihoods (1e-4, fp32), greedy flags and generated texts, and every
task metric, must equal those of ``lm_eval.simple_evaluate(HFLM(...))`` on the HF model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HF backend, the reference

from megatron_patch.utils.torchrun import free_port  # noqa: E402
from tests.launch import REPO  # noqa: E402

pytestmark = pytest.mark.distributed  # the command runs in its own processes
SCRIPT = Path(sys.executable).with_name("megatron-patch")
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]
MAX_LENGTH = 32  # shorter than the few-shot prompts and the perplexity documents
LIMIT = 6
TOLERANCE = 1e-4
# name -> (tiny model case, tp, extra command flags)
RUNS = {
    "dense-tp1-chat": ("llama3", 1, ["--apply-chat-template", "--num-fewshot", "1"]),
    "moe-tp1": ("qwen3_moe", 1, ["--num-fewshot", "2"]),
    "moe-tp2": ("qwen3_moe", 2, ["--num-fewshot", "2"]),
}


def run_cli(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``megatron-patch argv`` in a fresh process (the console script of this environment)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port())}
    return subprocess.run([str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``case -> (HF directory, converted Megatron checkpoint)``, each built once."""
    from megatron_patch.conversion import convert_hf_to_mcore
    from megatron_patch.conversion.tiny import save_random_model
    from megatron_patch.tokenizer.hf import TINY_TOKENIZER_DIR
    from tests.conversion.tiny_models import tiny_config

    built = {}
    for case in sorted({case for case, _, _ in RUNS.values()}):
        root = tmp_path_factory.mktemp(f"eval-{case}")
        # the shipped tokenizer's vocabulary and special tokens (EOS = padding = 0, no BOS)
        config = tiny_config(case, vocab_size=2048, bos_token_id=None, eos_token_id=0,
                             pad_token_id=0)
        hf = save_random_model(config, root / "hf")
        for file in TINY_TOKENIZER_DIR.iterdir():
            shutil.copy(file, hf / file.name)
        built[case] = (hf, convert_hf_to_mcore(hf, root / "mcore", progress=False))
    return built


def _flags(extra: list[str]) -> dict:
    """simple_evaluate's arguments for the command's ``extra`` flags."""
    fewshot = int(extra[extra.index("--num-fewshot") + 1])
    chat = "--apply-chat-template" in extra
    return {"num_fewshot": fewshot, "apply_chat_template": chat, "fewshot_as_multiturn": chat}


def reference(hf: Path, extra: list[str]) -> dict:
    """lm-eval's HF backend on the same tasks: results with samples."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from megatron_patch.evaluation.cli_eval import SHIPPED_TASKS

    model = HFLM(pretrained=str(hf), dtype="float32", device="cpu", max_length=MAX_LENGTH,
                 batch_size=4)
    return simple_evaluate(model=model, tasks=TASKS, limit=LIMIT, log_samples=True,
                           bootstrap_iters=0, task_manager=TaskManager(
                               include_path=str(SHIPPED_TASKS), include_defaults=False),
                           **_flags(extra))


def _leaves(value):
    """Response values as comparable scalars (lm-eval writes them to JSON as strings)."""
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, bool) or value in ("True", "False"):
        return [value in (True, "True")]
    try:
        return [float(value)]
    except ValueError:
        return [value]


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """name -> (our results JSON, our samples per task, lm-eval HF reference results)."""
    outcome = {}
    references = {}
    for name, (case, tp, extra) in RUNS.items():
        out = tmp_path_factory.mktemp(f"eval-{name}")
        result = run_cli("eval", "--load", str(checkpoints[case][1]), "--tasks",
                         ",".join(TASKS), "--limit", str(LIMIT), "--max-length", str(MAX_LENGTH),
                         "--batch-size", "3", "--tp", str(tp), "--bootstrap-iters", "0",
                         "--output-path", str(out), "--log-samples", *extra)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        (written,) = out.glob("*/results_*.json")
        assert f"wrote {written}" in result.stdout
        samples = {task: [json.loads(line) for line in
                          next(written.parent.glob(f"samples_{task}_*.jsonl")).read_text()
                          .splitlines()] for task in TASKS}
        key = (case, tuple(extra))
        if key not in references:
            references[key] = reference(checkpoints[case][0], extra)
        outcome[name] = (json.loads(written.read_text()), samples, references[key])
    return outcome


@pytest.mark.parametrize("name", RUNS)
def test_every_sample_equals_lm_eval_hf(runs, name):
    ours, samples, hf = runs[name]
    for task in TASKS:
        theirs = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        mine = sorted(samples[task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in theirs] == list(range(LIMIT))
        for a, b in zip(mine, theirs):
            assert a["prompt_hash"] == b["prompt_hash"], (task, a["doc_id"])  # same requests
            got, want = _leaves(a["resps"]), _leaves(b["resps"])
            assert len(got) == len(want), (task, a["doc_id"], got, want)
            for x, y in zip(got, want):
                if isinstance(y, float) and not isinstance(y, bool):
                    assert math.isclose(x, y, abs_tol=TOLERANCE), (task, a["doc_id"], got, want)
                else:
                    assert x == y, (task, a["doc_id"], got, want)


@pytest.mark.parametrize("name", RUNS)
def test_task_metrics_equal_lm_eval_hf(runs, name):
    ours, _, hf = runs[name]
    assert set(ours["results"]) == set(hf["results"]) == set(TASKS)
    for task in TASKS:
        for metric, value in hf["results"][task].items():
            if isinstance(value, float):
                assert math.isclose(ours["results"][task][metric], value, rel_tol=1e-5,
                                    abs_tol=1e-6), (task, metric)
    counts = ours["config"]  # tiny_mc's one-token answers to a question share one sequence
    assert 0 < counts["loglikelihood_sequences"] < counts["loglikelihood_requests"], counts
    texts = [s["resps"] for s in runs[name][1]["tiny_gen"]]
    assert any(t != [[""]] for t in texts), "generation produced nothing to compare"


def test_hub_tasks_fail_offline_naming_the_fix(tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: megatron-patch-test/does-not-exist\n"
        "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\n")
    result = run_cli("eval", "--load", str(tmp_path), "--tasks", "hub_task",
                     "--include-path", str(tmp_path))
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("megatron-patch eval: error: a task's data is not available "
                            "offline"), result.stderr
    assert "--include-path" in error


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    from megatron_patch.evaluation import cli_eval

    real = cli_eval.importlib.util.find_spec
    monkeypatch.setattr(cli_eval.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert cli_eval.main(["--load", "x", "--tasks", "tiny_mc"]) == 1
    assert "pip install megatron-patch[eval]" in capsys.readouterr().err


def test_results_print_as_json_without_lm_eval_table_writer(monkeypatch, caplog):
    import lm_eval.utils

    from megatron_patch.evaluation import cli_eval

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'pytablewriter'", name="pytablewriter")

    monkeypatch.setattr(lm_eval.utils, "make_table", missing)
    results = {"results": {"tiny_mc": {"acc,none": 0.25}}}
    assert json.loads(cli_eval._table(results, "results")) == results["results"]
    assert "needs pytablewriter" in caplog.text
