"""The LLaVA demo (examples/llava/run_mcore_llava.sh) trains at PP=2 (vision tower on the first
stage) on the shipped images with the loss falling; --freeze-ViT leaves the vision tower
bit-identical through Megatron's optimizer, and the trained checkpoint exports to HF."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_patch.conversion import ConversionError, convert_mcore_to_hf
from tests.conversion.tiny_models import read_safetensors
from tests.launch import REPO, losses


def test_demo_trains_at_pp2_with_frozen_vision_tower(tmp_path):
    env = {**os.environ, "OUTPUT": str(tmp_path), "TRAIN_ITERS": "12", "LOG_INTERVAL": "2",
           "NPROC_PER_NODE": "2", "PP": "2", "PYTHON": sys.executable,
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "examples/llava/run_mcore_llava.sh", "--freeze-ViT"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = losses(result.stdout)
    assert sorted(found) == list(range(2, 13, 2)), result.stdout[-2000:]
    assert found[12] < found[2] - 1.0, found

    original = read_safetensors(tmp_path / "demo-hf")
    trained = read_safetensors(convert_mcore_to_hf(tmp_path / "checkpoint", tmp_path / "hf",
                                                   hf_template=tmp_path / "demo-hf",
                                                   progress=False))
    assert sorted(trained) == sorted(original)
    changed = {name for name in original if not torch.equal(original[name], trained[name])}
    assert not {n for n in changed if n.startswith("vision_tower.")}
    assert any(n.startswith("multi_modal_projector.") for n in changed)
    assert any(n.startswith("language_model.") for n in changed)
    with pytest.raises(ConversionError, match="--hf-template"):  # training saves no metadata
        convert_mcore_to_hf(tmp_path / "checkpoint", tmp_path / "none", progress=False)
