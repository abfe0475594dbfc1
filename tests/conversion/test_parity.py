"""Megatron logits equal HF logits (fp32, max abs diff <= 1e-4) for every family at TP/PP 1-2.

All comparisons run in one torchrun launch of 4 gloo processes (TP*PP*DP = 4): each case sets
up its own Megatron parallel state and loads its checkpoint the way training does.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_patch.conversion import convert_hf_to_mcore
from tests.conversion.tiny_models import CASES, FEW_LAYOUTS, save_tiny_model
from tests.launch import REPO, run_module

TOLERANCE = 1e-4
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _checked(case: str, tp: int, pp: int) -> bool:
    return case not in FEW_LAYOUTS or tp == pp


def _cases(hf_models, converted, tmp):
    cases = [{"id": f"{case}-tp{tp}-pp{pp}", "hf": str(hf_models[case]),
              "mcore": str(converted[case]), "tp": tp, "pp": pp}
             for case in sorted(CASES) for tp, pp in LAYOUTS if _checked(case, tp, pp)]
    legacy = convert_hf_to_mcore(hf_models["qwen2"], tmp / "qwen2-legacy", tp=2, pp=2,
                                 ckpt_format="legacy", progress=False)
    extra = convert_hf_to_mcore(hf_models["llama3"], tmp / "llama3-extra", tp=2,
                                extra_vocab_size=20, make_vocab_size_divisible_by=1,
                                progress=False)
    cases += [
        {"id": "qwen2-legacy-tp2-pp2", "hf": str(hf_models["qwen2"]), "mcore": str(legacy),
         "tp": 2, "pp": 2},
        {"id": "llama3-extra-vocab-tp2", "hf": str(hf_models["llama3"]), "mcore": str(extra),
         "tp": 2, "pp": 1},
        {"id": "qwen3-from-hf-weights-tp2-pp2", "hf": str(hf_models["qwen3"]), "tp": 2,
         "pp": 2},
        {"id": "mistral-from-hf-weights-tp2", "hf": str(hf_models["mistral"]), "tp": 2,
         "pp": 1},
    ]
    return cases


@pytest.fixture(scope="module")
def parity(hf_models, converted, tmp_path_factory) -> dict[str, float]:
    tmp = tmp_path_factory.mktemp("parity")
    cases = _cases(hf_models, converted, tmp)
    (tmp / "cases.json").write_text(json.dumps(cases))
    result = run_module("tests.conversion.parity_worker", [str(tmp / "cases.json"),
                                                  str(tmp / "results.json")], nproc=4,
               timeout=1800)
    results = json.loads((tmp / "results.json").read_text())
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("PARITY")))
    print("\nmax abs logits diff per case:\n" + "\n".join(
        f"  {case:32s} {diff:.3e}" for case, diff in results.items()))
    assert sorted(results) == sorted(c["id"] for c in cases)
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("family", sorted(CASES) + ["qwen2-legacy", "llama3-extra-vocab",
                                                    "qwen3-from-hf-weights",
                                                    "mistral-from-hf-weights"])
def test_megatron_logits_match_hf(parity, family):
    mine = {case: diff for case, diff in parity.items() if case.rsplit("-tp", 1)[0] == family}
    assert mine, family
    assert all(diff <= TOLERANCE for diff in mine.values()), mine


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``megatron-patch ARGS`` (the console script's main) in a fresh process."""
    return subprocess.run([sys.executable, "-m", "megatron_patch.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _verify(*args: str) -> subprocess.CompletedProcess:
    return _cli("verify", "--seq-length", "16", *args)


@pytest.mark.distributed
def test_verify_cli(hf_models, converted, tmp_path):
    """`megatron-patch verify` relaunches under torchrun for TP*PP > 1 and fails on mismatch."""
    ok = _verify("--hf-dir", str(hf_models["qwen3"]), "--mcore-dir", str(converted["qwen3"]),
                 "--tp", "2")
    assert ok.returncode == 0 and "tp=2, pp=1): OK" in ok.stdout, ok.stdout + ok.stderr[-3000:]
    other = save_tiny_model("llama_mqa", tmp_path / "other", seed=1)
    bad = _verify("--hf-dir", str(other), "--mcore-dir", str(converted["llama_mqa"]))
    assert bad.returncode == 1 and "FAILED" in bad.stdout, bad.stdout + bad.stderr[-3000:]


@pytest.mark.distributed
def test_multi_query_model_converts_and_verifies_at_tp2(hf_models, tmp_path):
    """One key/value head, TP=2: ``convert hf-to-mcore --tp 2`` writes per-rank (legacy) files
    that ``verify --tp 2`` loads and matches against transformers."""
    out = tmp_path / "falcon-mqa-tp2"
    convert = _cli("convert", "hf-to-mcore", "--hf-dir", str(hf_models["falcon_mqa"]), "--out",
                   str(out), "--tp", "2", "--format", "legacy", "--no-progress")
    assert convert.returncode == 0, convert.stdout + convert.stderr[-3000:]
    assert sorted(p.name for p in (out / "release").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    ok = _verify("--hf-dir", str(hf_models["falcon_mqa"]), "--mcore-dir", str(out), "--tp", "2")
    assert ok.returncode == 0 and "tp=2, pp=1): OK" in ok.stdout, ok.stdout + ok.stderr[-3000:]
