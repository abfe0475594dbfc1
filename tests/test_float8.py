"""FP8 training without Transformer Engine: torchao float8 GEMMs in Megatron's parallel linears.

On the CPU torchao emulates float8 (values rounded to e4m3/e5m2 with dynamic scales, GEMMs in
high precision), so these tests check the wiring and the tensor/sequence-parallel collectives;
the speed is measured on GPUs by ``toolkits/benchmark/bench_training_step.py``.
"""

from __future__ import annotations

import pytest

from tests.launch import MOCK_DATA, TINY_MODEL, run_module

pytest.importorskip("torchao.float8")

COMMON = [*TINY_MODEL, *MOCK_DATA, "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "1e-3", "--train-iters", "8", "--log-interval", "1", "--seed", "3",
          "--eval-iters", "0"]


def _losses(args: list[str], nproc: int = 1) -> tuple[dict[int, float], str]:
    from tests.launch import losses

    out = run_module("megatron_patch.training.pretrain", args, nproc=nproc).stdout
    return losses(out), out


def test_float8_training_tracks_full_precision_at_every_layout():
    full, _ = _losses(COMMON)
    fp8, log = _losses([*COMMON, "--fp8-format", "hybrid"])
    assert "float8 training (torchao tensorwise): 16 linears" in log  # 4 layers x qkv/proj/fc1/fc2
    assert "WARNING: torchao float8 is not yet shown to train like bf16" in log
    assert fp8 != full, "float8 rounding must change the numbers"
    for step, loss in full.items():
        assert abs(fp8[step] - loss) / loss < 0.01, (step, fp8[step], loss)
    tp2, _ = _losses([*COMMON, "--fp8-format", "hybrid", "--tensor-model-parallel-size", "2",
                      "--sequence-parallel"], nproc=2)
    for step, loss in fp8.items():
        assert abs(tp2[step] - loss) < 2e-3, (step, tp2[step], loss)
