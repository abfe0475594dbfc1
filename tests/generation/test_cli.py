"""``megatron-patch generate`` / ``eval-ppl`` on a checkpoint saved by training (no metadata):
output format and order, malformed lines by line number (skip or fatal), atomic output, the
torchrun relaunch for TP=2 (the same for both commands)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.launch import REPO, TINY_MODEL, run_module

TRAIN = [*TINY_MODEL, "--patch-tokenizer-type", "ByteTokenizer", "--dataset", "mock",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
         "--lr", "1e-3", "--eval-iters", "0", "--save-interval", "2", "--model-family", "llama"]
PROMPTS = ["hello", json.dumps({"prompt": "abc", "id": "x"}), json.dumps({"prompt": 1}),
           "{oops", "hi"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    save = tmp_path_factory.mktemp("trained") / "checkpoint"
    run_module("megatron_patch.training.pretrain", [*TRAIN, "--save", str(save)])
    return save


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_patch.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.distributed
def test_generate_cli(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    common = ["generate", "--load", str(checkpoint), "--input", str(prompts), "--output",
              str(out), "--greedy", "--max-new-tokens", "6", "--ignore-eos", "--token-ids"]
    done = _cli(*common, "--on-error", "skip", "--batch-size", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{prompts}:3: 'prompt' is not text" in done.stderr
    assert f"{prompts}:4: bad JSON" in done.stderr
    records = _records(out)
    assert [r["line"] for r in records] == [1, 2, 5]  # input order, not length order
    assert [r["prompt"] for r in records] == ["hello", "abc", "hi"]
    assert records[1]["id"] == "x" and "id" not in records[0]
    assert [r["prompt_tokens"] for r in records] == [5, 3, 2]
    assert all(r["completion_tokens"] == 6 == len(r["completion_ids"]) for r in records)
    assert all(r["finish_reason"] == "length" for r in records)
    assert records[0]["prompt_ids"] == list(b"hello")

    # a malformed line stops the run by default; the existing output stays as it was
    before = out.read_text()
    failed = _cli(*common)
    assert failed.returncode == 1
    assert f"{prompts}:3: 'prompt' is not text" in failed.stderr
    assert out.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.txt"]


@pytest.mark.distributed
def test_eval_ppl_cli(checkpoint, tmp_path):
    documents = ["the cat sat on the mat", "a", "hello world"]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    result = tmp_path / "ppl.json"
    done = _cli("eval-ppl", "--load", str(checkpoint), "--data-path", str(data),
                "--seq-length", "8", "--output", str(result), "--tp", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    ppl = json.loads(result.read_text())
    assert ppl["tokens"] == sum(len(d) - 1 for d in documents)
    assert ppl["documents"] == 3 and ppl["seq_length"] == 8
    assert math.isclose(ppl["perplexity"], math.exp(ppl["mean_nll"]))
    assert f"perplexity {ppl['perplexity']:.4f}" in done.stdout
    assert done.stdout.count("perplexity ") == 1  # printed by rank 0 only
