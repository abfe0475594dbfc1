"""Baichuan/Baichuan2 and ChatGLM2/3: remote-code checkpoints, converted and checked against the
transformers class with the same mathematics.

Each checkpoint is written from a tiny transformers model (``tiny_models.DERIVED``): ChatGLM
from ``GlmForCausalLM``, Baichuan(2) from a multi-head ``LlamaForCausalLM`` (``W_pack``; for
Baichuan2 a NormHead whose normalised rows are the Llama ``lm_head``), Baichuan-13B from the
same Llama run with transformers' Bloom ALiBi tensor as attention bias and no rotary embedding.
The Megatron model is the converted checkpoint, built from its own family and arguments.
"""

import json

import pytest
import torch

from megatron_patch.conversion import convert_hf_to_mcore, convert_mcore_to_hf
from megatron_patch.utils.metadata import checkpoint_metadata
from tests.conversion.tiny_models import read_safetensors
from tests.launch import run_module

TOLERANCE = 1e-4
LAYOUTS = [(1, 1), (2, 2)]  # TP=2 and PP=2 both exercised
IGNORED = {"transformer.rotary_pos_emb.inv_freq"}  # a derived buffer, not written back


@pytest.mark.parametrize("name, family", [("chatglm", "chatglm"), ("baichuan", "baichuan"),
                                          ("baichuan2", "baichuan"),
                                          ("baichuan_alibi", "baichuan")])
def test_remote_code_round_trip_is_bit_identical(derived, tmp_path, name, family):
    _, model, mcore = derived[name]
    assert checkpoint_metadata(mcore)["family"] == family
    layout = convert_hf_to_mcore(model, tmp_path / "legacy", tp=2, pp=2, ckpt_format="legacy",
                                 progress=False)
    original = {k: v for k, v in read_safetensors(model).items() if k not in IGNORED}
    for source in (mcore, layout):
        back = read_safetensors(convert_mcore_to_hf(source, tmp_path / f"hf-{source.name}",
                                                    progress=False))
        assert sorted(back) == sorted(original)
        for key, tensor in original.items():
            assert torch.equal(back[key], tensor), key
    config = json.loads((tmp_path / f"hf-{mcore.name}" / "config.json").read_text())
    assert config["architectures"] == json.loads((model / "config.json").read_text())[
        "architectures"]


@pytest.mark.distributed
def test_remote_code_logits_match_their_transformers_reference(derived, tmp_path):
    cases = [{"id": f"{name}-tp{tp}-pp{pp}", "reference": str(reference), "mcore": str(mcore),
              "tp": tp, "pp": pp, "alibi": name == "baichuan_alibi"}
             for name, (reference, _, mcore) in derived.items() for tp, pp in LAYOUTS]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_module("tests.conversion.reference_worker",
               [str(tmp_path / "cases.json"), str(tmp_path / "results.json")], nproc=4)
    results = json.loads((tmp_path / "results.json").read_text())
    print("\nmax abs logits diff per case:\n" + "\n".join(
        f"  {case:28s} {diff:.3e}" for case, diff in results.items()))
    assert sorted(results) == sorted(c["id"] for c in cases)
    assert all(diff <= TOLERANCE for diff in results.values()), results
