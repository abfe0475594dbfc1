"""The Qwen2.5-VL demo (examples/qwen2_5_vl/run_mcore_qwen2_5_vl.sh) trains packed at PP=2
(vision tower on the first stage) on the shipped images of several sizes with the loss falling;
--freeze-ViT leaves the vision tower bit-identical through Megatron's optimizer, the trained
checkpoint exports to HF, and packed rows give exactly the per-token losses of their samples
trained alone."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_patch.conversion import convert_mcore_to_hf
from tests.conversion.tiny_models import read_safetensors
from tests.launch import REPO, free_port, losses


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's output directory and log: PP=2, packed rows of 160 tokens, frozen tower."""
    out = tmp_path_factory.mktemp("qwen2_5_vl_demo")
    env = {**os.environ, "OUTPUT": str(out), "TRAIN_ITERS": "12", "LOG_INTERVAL": "2",
           "NPROC_PER_NODE": "2", "PP": "2", "SEQ_LEN": "160", "PYTHON": sys.executable,
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "examples/qwen2_5_vl/run_mcore_qwen2_5_vl.sh",
                             "--freeze-ViT", "--sft-packing"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_demo_trains_packed_at_pp2_with_frozen_vision_tower(demo_run, tmp_path):
    out, log = demo_run
    found = losses(log)
    assert sorted(found) == list(range(2, 13, 2)), log[-2000:]
    assert found[12] < found[2] - 1.0, found

    original = read_safetensors(out / "demo-hf")
    trained = read_safetensors(convert_mcore_to_hf(out / "checkpoint", tmp_path / "hf",
                                                   hf_template=out / "demo-hf",
                                                   progress=False))
    assert sorted(trained) == sorted(original)
    changed = {name.removeprefix("model.") for name in original
               if not torch.equal(original[name], trained[name])}  # visual.* / layers.* / ...
    assert not {n for n in changed if n.startswith("visual.") and
                not n.startswith("visual.merger.")}
    assert any(n.startswith("visual.merger.") for n in changed)
    assert any(n.startswith(("layers.", "language_model.")) for n in changed)
    for converted in (out / "demo-mcore", tmp_path / "hf"):  # the image settings travel along
        assert (converted / "preprocessor_config.json").is_file()


def test_packed_rows_give_the_losses_of_their_samples(demo_run, tmp_path):
    out, _ = demo_run
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(free_port()), "-m", "tests.vlm.qwen2_vl_packing_worker",
               str(out / "demo-hf"), str(out / "demo-mcore"), str(tmp_path / "out.json")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    diffs = json.loads((tmp_path / "out.json").read_text())
    assert diffs["samples"] >= 4
    assert diffs["packed"] <= 1e-5, diffs
    assert diffs["cross"] > 1e-2, diffs  # without the document mask the losses differ


def test_packing_is_refused_for_llava(tmp_path):
    from megatron_patch.training import vlm
    from toolkits.benchmark.bench_vlm import llava_config

    (tmp_path / "config.json").write_text(json.dumps(llava_config("tiny")))
    with pytest.raises(ValueError, match="--sft-packing is not supported for --model-family "
                                         "llava yet"):
        vlm.main(["--hf-config-path", str(tmp_path), "--micro-batch-size", "1",
                  "--global-batch-size", "1", "--seq-length", "64", "--train-iters", "1",
                  "--lr", "1e-4", "--sft-packing"])
