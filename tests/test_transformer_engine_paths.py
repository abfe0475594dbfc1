"""What changes when Transformer Engine is installed, checked without it (CPU).

Each case is one failure of the first GPU run with TE 2.18 (no apex, no flash-attn): Megatron's
own linears lost the gradient-accumulation kernel, ``FL=true`` asked TE for flash-attn, TE's
gradient norm (a tensor) broke the log line, TE's fused-norm parameters were initialised as
weights instead of ones, and TE loaded a second cuDNN beside torch's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.arguments import parse_training_args
from megatron_patch.launch.command import compose
from megatron_patch.launch.settings import RunSettings
from megatron_patch.models import init
from megatron_patch.runtime import gpu_fast_paths, one_cudnn
from megatron_patch.runtime.backends import Backends, flash_attention_backend
from megatron_patch.training.loop import as_float
from tests.launch import MOCK_DATA, TINY_MODEL

TE_ONLY = Backends(cuda=True, transformer_engine=True, apex=False, flash_attn=False)
CONTAINER = Backends(cuda=True, transformer_engine=True, apex=True, flash_attn=True)
TORCH = Backends(cuda=True, transformer_engine=False, apex=False, flash_attn=False)


def test_megatron_linears_get_the_torch_wgrad_kernel_next_to_transformer_engine(monkeypatch):
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(gpu_fast_paths, "available_backends", lambda: TE_ONLY)
    monkeypatch.setattr(gpu_fast_paths, "_mixed_precision_addmm", lambda: True)
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda", None, raising=False)
    assert gpu_fast_paths.install_wgrad_accumulation()
    assert layers.fused_weight_gradient_mlp_cuda is gpu_fast_paths.TorchWgradAccumulation


def test_saved_gpu_arguments_build_where_the_fusion_kernel_is_missing():
    """A checkpoint saved on a GPU asks for gradient-accumulation fusion; a process without
    the kernel (``convert mcore-to-hf``, on the CPU or before any install) turns it off."""
    import argparse

    from megatron_patch.models.builder import transformer_config_from_args

    args = parse_training_args(TINY_MODEL + MOCK_DATA + ["--micro-batch-size", "1"])
    args.padded_vocab_size = 256
    saved = argparse.Namespace(**{**vars(args), "gradient_accumulation_fusion": True})
    assert not transformer_config_from_args(saved).gradient_accumulation_fusion


@pytest.mark.parametrize("backends, flag", [(TE_ONLY, "fused"), (CONTAINER, "flash"),
                                            (TORCH, None)])
def test_fl_true_asks_for_an_installed_attention_backend(backends, flag, tmp_path, monkeypatch):
    assert flash_attention_backend(backends)[0] == flag
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    launch = compose("llama", "pretrain", RunSettings(output_basepath=str(tmp_path), fl=True,
                                                      pr="bf16"), [], backends)
    if flag is None:
        assert "--attention-backend" not in launch.train
    else:
        assert launch.train[launch.train.index("--attention-backend") + 1] == flag
    assert any(note.startswith("FL=true: ") for note in launch.notes)


def test_gradient_norm_of_transformer_engine_is_logged_as_a_float():
    assert as_float(torch.tensor([2.5])) == 2.5 and isinstance(as_float(torch.tensor([1.0])), float)
    assert as_float(None) is None and f"{as_float(torch.tensor([0.25])):.3f}" == "0.250"


class _TELayerNormLinear(torch.nn.Module):
    """Transformer Engine's fused norm + linear parameter names."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(8, 8))
        self.layer_norm_weight = torch.nn.Parameter(torch.empty(8))
        self.layer_norm_bias = torch.nn.Parameter(torch.empty(8))


class RMSNorm(torch.nn.Module):  # noqa: D101 - TE's norm class is a torch Module named so
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(8))


def test_transformer_engine_norm_parameters_start_at_one(model_parallel):
    config = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2,
                               init_method_std=0.02)
    chunk = torch.nn.Module()
    chunk.linear_qkv, chunk.final_layernorm = _TELayerNormLinear(), RMSNorm()
    init.init_layout_invariant([chunk], config, seed=3, tied=False)
    assert torch.equal(chunk.linear_qkv.layer_norm_weight, torch.ones(8))
    assert torch.equal(chunk.linear_qkv.layer_norm_bias, torch.zeros(8))
    assert torch.equal(chunk.final_layernorm.weight, torch.ones(8))
    assert 0.01 < chunk.linear_qkv.weight.std() < 0.03


def test_fp32_comparisons_restart_with_tf32_off_on_a_gpu(monkeypatch):
    """TE's fp32 GEMMs run in TF32 unless NVIDIA_TF32_OVERRIDE=0 is set when the process starts
    (GPU: MoE verify 0.49 max logits difference): verify and card re-execute with it."""
    from megatron_patch.conversion.cli import verify as cli_verify
    from megatron_patch.runtime import exact_fp32

    calls = []

    def execve(path, argv, env):
        calls.append((argv, env.get(exact_fp32.TF32_OVERRIDE)))
        raise SystemExit(0)

    monkeypatch.setattr(exact_fp32.os, "execve", execve)
    monkeypatch.delenv(exact_fp32.TF32_OVERRIDE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = ["--hf-dir", "h", "--mcore-dir", "m", "--tp", "2"]
    with pytest.raises(SystemExit):
        cli_verify.main(argv)
    assert calls == [(exact_fp32.exact_fp32_argv("verify", argv), "0")]
    assert calls[0][0][1:4] == ["-m", "megatron_patch.cli", "verify"]
    with pytest.raises(SystemExit):  # fp32 training: exact fp32 too
        cli_verify.main(argv + ["--train-steps", "20", "--precision", "fp32"])
    assert [env for _, env in calls] == ["0", "0"]
    calls.clear()
    # bf16 training (the GPU default) compares at bf16 tolerance, which TF32 does not spoil:
    # no restart; the run goes on to its input checks, which refuse the missing directories
    assert cli_verify.main(argv + ["--train-steps", "20"]) == 1
    assert cli_verify.main(argv + ["--train-steps", "20", "--precision", "bf16"]) == 1
    assert calls == []

    monkeypatch.setenv(exact_fp32.TF32_OVERRIDE, "0")  # the restarted process goes on
    exact_fp32.restart_with_exact_fp32("verify", argv)
    monkeypatch.delenv(exact_fp32.TF32_OVERRIDE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: nothing to do
    exact_fp32.restart_with_exact_fp32("verify", argv)
    assert calls == []


ONE_CUDNN = Path(__file__).resolve().parents[1] / "megatron_patch/runtime/one_cudnn.py"
RUN_ONE_CUDNN = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("one_cudnn", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.share_torch_cudnn_with_transformer_engine()
print(os.environ.get("CUDNN_HOME"))
"""


def _torch_cudnn_directory() -> str | None:
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return one_cudnn.loaded_cudnn_directory(maps)


def test_cudnn_library_is_found_in_a_process_memory_map():
    maps = ("7f00-7f10 r-xp 00000000 08:01 42    /venv/nvidia/cudnn/lib/libcudnn_graph.so.9\n"
            "7f10-7f20 r--p 00000000 00:00 0 \n"
            "7f20-7f30 r-xp 00000000 08:01 43    /venv/nvidia/cudnn/lib/libcudnn.so.9\n")
    assert one_cudnn.loaded_cudnn_directory(maps) == "/venv/nvidia/cudnn/lib"
    assert one_cudnn.loaded_cudnn_directory(maps.splitlines()[1]) is None
    assert one_cudnn.cudnn_home_for_transformer_engine(maps, {"CUDNN_PATH": "/opt/cudnn"}) is None
    assert one_cudnn.cudnn_home_for_transformer_engine(maps, {}) == "/venv/nvidia/cudnn/lib"


@pytest.mark.skipif(_torch_cudnn_directory() is None, reason="this torch build loads no cuDNN")
@pytest.mark.parametrize("user_choice", [None, "/opt/cudnn"])
def test_transformer_engine_is_pointed_at_torchs_cudnn(user_choice, tmp_path):
    """With TE importable (a stand-in package), its cuDNN search starts at torch's copy."""
    (tmp_path / "transformer_engine").mkdir()
    (tmp_path / "transformer_engine/__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in one_cudnn.USER_CHOICES}
    env["PYTHONPATH"] = str(tmp_path)
    if user_choice:
        env["CUDNN_PATH"] = user_choice
    out = subprocess.run([sys.executable, "-c", RUN_ONE_CUDNN, str(ONE_CUDNN)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()[-1]
    directory = _torch_cudnn_directory()
    assert out == ("None" if user_choice else directory)
    assert user_choice or any(p.name.startswith("libcudnn.so") for p in Path(directory).iterdir())
