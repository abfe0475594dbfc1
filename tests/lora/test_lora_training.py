"""LoRA training on the CPU (gloo): frozen base, adapters-only checkpoints that resume
bit-identically and load at another TP, routed experts adapted, export, merge and verify
commands."""

import json
import os
import subprocess
import sys

import pytest
import torch
from megatron.core import dist_checkpointing
from safetensors.torch import load_file

from tests.launch import REPO, pretrain

RUN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
       "--lr", "1e-2", "--min-lr", "1e-2", "--dataset", "mock", "--vocab-size", "250",
       "--log-interval", "1", "--eval-iters", "0", "--attention-dropout", "0",
       "--hidden-dropout", "0"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _train(base, save, iters: int, nproc: int = 2, extra=()) -> dict[int, float]:
    """LoRA training of rank 4 on the frozen ``base``; ``base`` None: the ``--load`` in
    ``extra`` is an adapter checkpoint that says both (no --lora-* flags)."""
    lora = ["--pretrained-checkpoint", str(base), "--lora-rank", "4"] if base else []
    return pretrain([*lora, "--save", str(save), "--train-iters", str(iters), *RUN, *extra],
                    nproc=nproc)


def _saved_keys(run, iteration: int) -> dict[str, tuple]:
    directory = run / f"iter_{iteration:07d}"
    return {key: tuple(meta.global_shape)
            for key, meta in dist_checkpointing.load_tensors_metadata(str(directory)).items()}


@pytest.mark.distributed
def test_lora_resumes_bit_identically_and_exports(lora_models, tmp_path):
    paths = lora_models["qwen2"]
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--save-interval", "2"]
    first = _train(paths["mcore"], tmp_path / "run", 4, extra=layout)
    # resumed with --load only: the base and the --lora-* settings come from the checkpoint
    resumed = _train(None, tmp_path / "resumed", 4,
                     extra=[*layout, "--load", str(tmp_path / "run"), "--ckpt-step", "2"])
    assert sorted(resumed) == [3, 4]
    assert [resumed[i] for i in (3, 4)] == [first[i] for i in (3, 4)], (first, resumed)
    assert first[4] < first[1]
    # the same training at TP1 (with the distributed optimizer): the sharded adapters' forward
    # and gradients are TP1's
    single = _train(paths["mcore"], tmp_path / "tp1", 4, nproc=1,
                    extra=["--use-distributed-optimizer", "--save-interval", "4"])
    assert [single[i] for i in range(1, 5)] == pytest.approx([first[i] for i in range(1, 5)],
                                                             rel=1e-5)
    keys = _saved_keys(tmp_path / "run", 4)  # adapters (and their optimizer state) only
    assert keys and all(key.endswith((".lora.A", ".lora.B")) for key in keys), sorted(keys)
    assert keys["decoder.layers.self_attention.linear_qkv.lora.A"] == (4, 12, 64)
    env = ENV
    cli = [sys.executable, "-m", "megatron_patch.cli"]
    export = subprocess.run([*cli, "export-lora", "--load", str(tmp_path / "run"), "--out",
                             str(tmp_path / "adapter"), "--hf-template", str(paths["hf"])],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert export.returncode == 0, export.stderr
    verify = subprocess.run([*cli, "verify", "--hf-dir", str(paths["hf"]), "--adapter-dir",
                             str(tmp_path / "adapter"), "--mcore-dir", str(tmp_path / "run"),
                             "--seq-length", "32", "--tolerance", "1e-5"],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "OK" in verify.stdout


@pytest.mark.distributed
def test_lora_on_experts_trains_at_etp2_and_resumes_at_tp1(lora_models, tmp_path):
    from megatron_patch.conversion.lora_peft import export_lora
    from megatron_patch.conversion.verify.logits import hf_logits
    from megatron_patch.conversion.verify.lora import peft_logits

    base = lora_models["qwen3_moe"]["mcore"]
    # experts split over 2 expert-TP ranks (the adapters' gradients: test_lora_interchange)
    first = _train(base, tmp_path / "run", 3, extra=["--tensor-model-parallel-size", "2",
                                                     "--sequence-parallel", "--save-interval",
                                                     "2", "--expert-tensor-parallel-size", "2"])
    keys = _saved_keys(tmp_path / "run", 2)
    assert keys["decoder.layers.mlp.experts.experts.linear_fc1.lora.B"][-1] == 4, sorted(keys)
    # the adapters saved at TP2 / ETP2 load at TP1: the loss of the next batch is the same (the
    # optimizer's expert parameter groups differ between these layouts: not loaded)
    on_tp1 = _train(base, tmp_path / "tp1", 3, nproc=1,
                    extra=["--save-interval", "2", "--load", str(tmp_path / "run"),
                           "--ckpt-step", "2",
                           "--no-load-optim", "--no-load-rng"])
    assert sorted(on_tp1) == [3]
    assert on_tp1[3] == pytest.approx(first[3], rel=1e-5)
    assert torch.isfinite(torch.tensor(list(first.values()))).all()
    # the trained expert adapters export as PEFT's target_parameters, which PEFT loads; their
    # update is not zero (they trained: the grouped-GEMM experts run the hooked linears)
    paths = lora_models["qwen3_moe"]
    adapter = export_lora(tmp_path / "run", tmp_path / "adapter", paths["hf"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    gate_up_b = tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"]
    assert gate_up_b.shape == (32, 4 * 8) and gate_up_b.abs().max() > 0
    tokens = torch.randint(0, 250, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = peft_logits(paths["hf"], tokens, adapter_dir=adapter)
    assert torch.isfinite(expected).all()
    # ``megatron-patch export-lora --merge`` (a fresh process): the base with the trained
    # attention and per-expert updates added is HF + PEFT's model
    merge = subprocess.run([sys.executable, "-m", "megatron_patch.cli", "export-lora", "--load",
                            str(tmp_path / "run"), "--out", str(tmp_path / "merged"),
                            "--hf-template", str(paths["hf"]), "--merge"],
                           cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert (hf_logits(tmp_path / "merged", tokens) - expected).abs().max() <= 1e-5
    assert (hf_logits(paths["hf"], tokens) - expected).abs().max() > 1e-3  # the update matters


def test_resume_refuses_other_lora_settings(lora_models, tmp_path):
    """Flags that disagree with an adapter checkpoint's settings stop the run before it starts,
    naming both values (the entry point in a fresh process, no torchrun: it fails parsing)."""
    checkpoint = lora_models["qwen2"]["lora"]  # imported: rank 4, alpha 8, attention + MLP
    done = subprocess.run([sys.executable, "-m", "megatron_patch.training.pretrain", *RUN,
                           "--load", str(checkpoint), "--save", str(tmp_path / "run"),
                           "--train-iters", "1", "--lora-rank", "8", "--lora-alpha", "8"],
                          cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    error = [line for line in done.stderr.splitlines() if "LoraError: " in line]
    assert done.returncode != 0 and error, done.stderr[-3000:]
    assert "(--lora-rank 8 given, the checkpoint's is 4)" in error[-1]  # alpha 8 agrees
    assert "Drop the --lora-* flags" in error[-1]
