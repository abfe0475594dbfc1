"""The ``finetune`` entry point: the launcher's demo trains and saves, checkpoints load with
``--finetune``, and the logged loss is the masked mean over the whole global batch."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.launch import REPO, TINY_MODEL, free_port, losses, run_module

SCRIPT = REPO / "examples" / "llama" / "run_finetune_mcore_llama.sh"
CHAT = REPO / "megatron_patch" / "assets" / "tiny_chat.jsonl"
GBS, PAD_LEN = 16, 128


def _launch(out, iterations, warmup, checkpoint="none", extra=()):
    """The finetune launcher with its default settings except the run length and paths."""
    args = ["dsw", "tiny", "8", str(GBS), "1e-3", "1e-4", "128", str(PAD_LEN), "auto", "1", "1",
            "1", "false", "false", "true", "none", "15", "shipped", checkpoint,
            str(iterations * GBS * PAD_LEN), str(warmup * GBS * PAD_LEN), str(out), *extra]
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    return out, _launch(out, 30, 3)


@pytest.mark.distributed
def test_demo_finetune_trains_and_saves(demo_run):
    out, stdout = demo_run
    found = losses(stdout)
    assert sorted(found) == [10, 20, 30]
    assert found[30] < found[10] - 1.0, found
    assert "sft data" in stdout and "1500 samples, 0 skipped" in stdout
    (run,) = (out / "checkpoint").iterdir()
    assert run.name.startswith("finetune-mcore-llama-tiny-")
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (run / "iter_0000015").is_dir() and (run / "iter_0000030").is_dir()


@pytest.mark.distributed
def test_checkpoint_loads_with_finetune_flags(demo_run, tmp_path):
    out, stdout = demo_run
    (checkpoint,) = (out / "checkpoint").iterdir()
    resumed = _launch(tmp_path, 2, 0, str(checkpoint), ["--log-interval", "1"])
    (log,) = (tmp_path / "log").glob("*.log")  # the argument dump goes to the log file only
    assert re.search(r" finetune \.+ True", log.read_text())
    assert f"successfully loaded checkpoint from {checkpoint}" in resumed
    first = losses(resumed)
    assert sorted(first) == [1, 2]  # iteration counting restarts
    assert first[1] < losses(stdout)[10] - 1.0, (first, losses(stdout))  # trained weights


@pytest.mark.distributed
def test_loss_and_gradient_are_the_global_masked_mean(tmp_path):
    out = tmp_path / "losses.json"
    args = [*TINY_MODEL, "--seq-length", "128", "--max-position-embeddings", "128",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1",
            "--lr", "1e-3", "--log-interval", "1", "--num-workers", "0",
            "--patch-tokenizer-type", "TinyTokenizer", "--data-path", str(CHAT),
            "--split", "100,0,0", "--sft-packing", "--clip-grad", "0"]
    run_module("tests.sft_loss_worker", [str(out), *args], nproc=2)  # DP=2, 2 micro-batches each
    result = json.loads(out.read_text())
    for key in ("per_token", "per_sequence"):
        logged, reference = result[key]
        assert logged == pytest.approx(reference, rel=1e-5), (key, result)
    difference, scale = result["grad"]  # gradient of the global mean, not of a mean of means
    assert difference <= 1e-5 * scale, result
