"""bench_node_scale: the proxy's extrapolation against Megatron's own FLOP count of the full
model, and one tiny proxy run on the CPU (a 2-stage, EP=2 target of a Qwen3-MoE stand-in)."""

import argparse
import json
import subprocess
import sys

import pytest
from megatron.training.training import num_floating_point_operations

from megatron_patch.launch.flags import megatron_defaults
from megatron_patch.launch.memory import bubble_fraction
from megatron_patch.models.registry import get_family
from tests.launch import REPO
from toolkits.benchmark.bench_node_scale import (
    extrapolate,
    logit_flops_per_token,
    plan_target,
    proxy_model_flags,
    proxy_shape,
)


def _flops_per_token(target, seq: int, **overrides) -> float:
    """Megatron's training FLOPs per token of ``target``'s model (TP=1 vocabulary padding)."""
    args = argparse.Namespace(**{**megatron_defaults(),
                                 **get_family(target.family).hf_to_megatron(target.hf_config),
                                 "seq_length": seq, **overrides})
    args.padded_vocab_size = target.shape.padded_vocab(1)
    return num_floating_point_operations(args, 1) / seq


@pytest.mark.parametrize("name,fixed,flags", [
    ("llama3.1-8b", {}, ["--num-layers", "16"]),
    ("qwen3-30b-a3b", {"ep": 8},
     ["--num-layers", "48", "--num-experts", "16", "--moe-layer-freq", str([1] * 48)]),
])
def test_extrapolation_matches_megatron_flops(name, fixed, flags):
    target = plan_target(name, 8, 8192, 64, "bf16", 80.0, fixed)
    layout = target.layout
    assert proxy_model_flags(target.shape, layout) == [f.replace(" ", "") for f in flags]
    proxy = proxy_shape(target.shape, layout)
    proxy_flops = _flops_per_token(target, 8192, num_layers=proxy.layers)
    logit = logit_flops_per_token(proxy.hidden, proxy.padded_vocab(1))
    result = extrapolate(10_000.0, proxy_flops, layout, logit)
    assert result["flops_per_token"] == pytest.approx(_flops_per_token(target, 8192), rel=1e-12)
    # The plan's layouts: 8B at PP=2 x VPP=2 with 16 micro-batches, 30B-A3B at PP=1.
    bubble = {"llama3.1-8b": 1 / 33, "qwen3-30b-a3b": 0.0}[name]
    assert bubble_fraction(layout) == pytest.approx(bubble)
    assert result["tokens_per_s_per_gpu"] == pytest.approx(10_000 * (1 - bubble) / layout.pp)
    assert result["tokens_per_s"] == pytest.approx(8 * result["tokens_per_s_per_gpu"])
    assert result["mfu"] == pytest.approx(
        result["flops_per_token"] * result["tokens_per_s_per_gpu"] / 989e12)


def test_proxy_needs_top_k_experts_per_gpu():
    target = plan_target("qwen3-30b-a3b", 128, 8192, 1024, "bf16", 80.0, {"ep": 32})
    with pytest.raises(ValueError, match="fewer than top-k 8"):
        proxy_shape(target.shape, target.layout)


def test_tiny_proxy_run(tmp_path):
    out = tmp_path / "node.json"
    command = [sys.executable, "-m", "toolkits.benchmark.bench_node_scale", "--tiny",
               "--model", "qwen3-30b-a3b", "--target-gpus", "4", "--pp", "2", "--ep", "2",
               "--devices", "1", "--steps", "4", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "EXTRAPOLATED to 4 GPUs" in result.stdout
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["branch"] == "proxy" and len(run["rows"]) == 4
    assert run["summary"]["loss_finite"] and run["summary"]["load_balancing_loss"]
    assert run["peak_memory"]["0"]["allocated"] > 0
    target = plan_target("qwen3-30b-a3b", 4, 64, 16, "fp32", 80.0, {"pp": 2, "ep": 2}, tiny=True)
    assert report["layout"].startswith("TP=1 PP=2")
    # The run's own Megatron FLOP count of the 2-layer, 4-expert proxy extrapolates to the
    # 4-layer model's.
    extrapolated = run["extrapolated"]
    assert run["flops_per_token"] == pytest.approx(_flops_per_token(target, 64, num_layers=2))
    assert extrapolated["flops_per_token"] == pytest.approx(_flops_per_token(target, 64))
    assert extrapolated["tokens_per_s_per_gpu"] == pytest.approx(
        run["summary"]["tokens_per_s"] * (1 - extrapolated["bubble"]) / 2)
