"""The README's main job: the launcher with the shipped corpus and tokenizer trains and saves."""

import os
import subprocess
import sys

import pytest

from tests.launch import REPO, free_port, losses

SCRIPT = REPO / "examples" / "llama" / "run_pretrain_mcore_llama.sh"


@pytest.mark.distributed
def test_tiny_llama_trains_on_shipped_data(tmp_path):
    iters, gbs, seq = 40, 16, 128
    args = ["dsw", "tiny", "8", str(gbs), "1e-3", "1e-4", str(seq), str(seq), "auto", "1", "1",
            "1", "false", "false", "true", "none", "20", "shipped", "none",
            str(iters * gbs * seq), str(4 * gbs * seq), str(tmp_path)]
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = losses(result.stdout)
    assert sorted(found) == [10, 20, 30, 40]
    assert found[40] < found[10] - 1.0, found
    assert (tmp_path / "data" / "tiny_corpus_text_document.idx").is_file()
    (run,) = (tmp_path / "checkpoint").iterdir()
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    assert (run / "iter_0000020").is_dir() and (run / "iter_0000040").is_dir()
    assert any((tmp_path / "tensorboard" / run.name).glob("events.out.tfevents.*"))
    assert "lm loss" in (tmp_path / "log" / f"{run.name}.log").read_text()
