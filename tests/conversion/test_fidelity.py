"""Training fidelity: ``megatron-patch verify --layers`` and ``--train-steps`` (issue 13).

One torchrun launch of 2 gloo processes runs every comparison: the per-layer activation table
at TP=1 (DP=2), TP=2 and PP=2, a checkpoint whose layer 2 has k and v swapped (as a broken
mapping would), and 20 fp32 AdamW steps of Llama, Qwen2 (tied embeddings) and Qwen3 at
(TP, PP) = (1, 1) with DP=2, (2, 1) and (1, 2), of Mixtral at EP=2, and 5 of the multi-query
Falcon and StarCoder at TP=2 (one key/value head for two ranks), against transformers +
torch's AdamW. ``verify --train-steps --plot`` through the console script, on a trained padded
vocabulary: tests/test_cli_end_to_end.py.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_patch.conversion import convert_hf_to_mcore
from megatron_patch.conversion.verify.training import (
    Hyper,
    TrainingCurves,
    hf_training_curve,
    training_batches,
)
from tests.conversion.tiny_models import read_safetensors, save_tiny_model
from tests.launch import REPO, run_module

LAYER_TOLERANCE = 1e-4  # relative, per activation
LOSS_TOLERANCE = 1e-4  # relative, per step (the fp32 bound)
TRAIN_CASES = ["llama_mha", "qwen2_tied", "qwen3"]
TRAIN_LAYOUTS = [(1, 1), (2, 1), (1, 2)]
MQA_TRAIN = ["falcon_mqa", "starcoder_mqa"]  # at TP=2
MQA_STEPS = 5
BROKEN_LAYER = 2


def _swap_kv(hf_dir, out, layer: int):
    """Copy of an HF model with layer ``layer``'s k_proj and v_proj weights swapped."""
    tensors = read_safetensors(hf_dir)
    prefix = f"model.layers.{layer}.self_attn."
    k, v = tensors[prefix + "k_proj.weight"], tensors[prefix + "v_proj.weight"]
    tensors[prefix + "k_proj.weight"], tensors[prefix + "v_proj.weight"] = v, k
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out / "config.json")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case -> (HF dir, Megatron checkpoint without vocabulary padding), plus the broken one."""
    root = tmp_path_factory.mktemp("fidelity")
    found = {}
    for case in TRAIN_CASES + MQA_TRAIN + ["mixtral"]:
        hf = save_tiny_model(case, root / case)
        found[case] = (hf, convert_hf_to_mcore(hf, root / f"{case}-mcore", progress=False,
                                               make_vocab_size_divisible_by=1))
    found["broken"] = (_swap_kv(found["qwen3"][0], root / "qwen3-kv-swapped", BROKEN_LAYER),
                       found["qwen3"][1])
    return found


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity-run")

    def job(kind, case, tp, pp, ep=1, **extra):
        hf, mcore = models[case]
        return {"id": f"{kind}-{case}-tp{tp}-pp{pp}" + (f"-ep{ep}" if ep > 1 else ""),
                "kind": kind, "hf": str(hf), "mcore": str(mcore), "tp": tp, "pp": pp, "ep": ep,
                **extra}

    jobs = [job("layers", "qwen3", 1, 1), job("layers", "qwen3", 2, 1),
            job("layers", "qwen3", 1, 2), job("layers", "broken", 1, 2)]
    jobs += [job("train", case, tp, pp, steps=20) for case in TRAIN_CASES
             for tp, pp in TRAIN_LAYOUTS]
    jobs += [job("layers", "mixtral", 1, 1, ep=2), job("train", "mixtral", 1, 1, ep=2, steps=20)]
    jobs += [job("train", case, 2, 1, steps=MQA_STEPS) for case in MQA_TRAIN]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    run_module("tests.conversion.fidelity_worker",
               [str(tmp / "jobs.json"), str(tmp / "results.json")], nproc=2, timeout=900)
    return json.loads((tmp / "results.json").read_text())


def _first_over(rows):
    return next(((layer, point) for layer, point, _, rel in rows if rel > LAYER_TOLERANCE), None)


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["qwen3-tp1-pp1", "qwen3-tp2-pp1", "qwen3-tp1-pp2",
                                 "mixtral-tp1-pp1-ep2"])
def test_layer_table_matches_hf_at_every_layout(results, run):
    rows = results[f"layers-{run}"]
    assert len(rows) == 4 * 3 + 2  # input/attention/mlp of 4 layers, final norm, logits
    assert _first_over(rows) is None, rows
    assert rows[-1][:2] == [None, "logits"] and rows[-1][2] < 1e-4


@pytest.mark.distributed
def test_layer_table_names_the_broken_layer(results):
    rows = results["layers-broken-tp1-pp2"]
    assert _first_over(rows) == (BROKEN_LAYER, "attention"), rows
    assert rows[-1][3] > 1e-2  # and the logits are off


@pytest.mark.distributed
@pytest.mark.parametrize("run", [f"{case}-tp{tp}-pp{pp}" for case in TRAIN_CASES
                                 for tp, pp in TRAIN_LAYOUTS] + ["mixtral-tp1-pp1-ep2"])
def test_training_matches_hf_for_20_steps(results, run):
    curves = TrainingCurves(**results[f"train-{run}"])
    assert len(curves.megatron_loss) == 20
    assert curves.ok(LOSS_TOLERANCE), curves.table(LOSS_TOLERANCE)


@pytest.mark.distributed
@pytest.mark.parametrize("case", MQA_TRAIN)
def test_multi_query_training_at_tp2_matches_hf(results, case):
    curves = TrainingCurves(**results[f"train-{case}-tp2-pp1"])
    assert len(curves.megatron_loss) == MQA_STEPS
    assert curves.ok(LOSS_TOLERANCE), curves.table(LOSS_TOLERANCE)


def test_training_comparison_is_sensitive_to_the_schedule(models):
    """A one-step-longer warmup on one side already exceeds the tolerance."""
    hf, _ = models["qwen3"]
    batches = training_batches(250, 6, 2, 16)
    torch.manual_seed(0)
    base = hf_training_curve(hf, batches, Hyper())
    other = hf_training_curve(hf, batches, Hyper(warmup_steps=3))
    curves = TrainingCurves(base[0], other[0], base[1], other[1])
    assert not curves.ok(LOSS_TOLERANCE)
    assert max(curves.loss_rel) > 10 * LOSS_TOLERANCE, curves.table(LOSS_TOLERANCE)


def _verify(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megatron_patch.cli", "verify", "--seq-length", "16", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})


@pytest.mark.distributed
def test_verify_layers_cli_fails_naming_the_layer(models):
    hf, mcore = models["broken"]
    bad = _verify("--hf-dir", str(hf), "--mcore-dir", str(mcore), "--layers", "--tp", "2")
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert f"first over relative tolerance 0.0001: layer {BROKEN_LAYER} attention" in bad.stdout
    assert "Traceback" not in bad.stderr  # the ranks exit 0, the relaunch returns rank 0's 1
