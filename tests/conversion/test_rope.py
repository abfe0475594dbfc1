"""HF rope variants (linear, dynamic, yarn, longrope, llama3 with any constants) against
transformers: rotary tables, logits at TP/PP (and CP training losses), the config mapping both ways,
refusals, and the public commands on a Qwen2.5-style yarn model."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megatron_patch.conversion import convert_hf_to_mcore
from megatron_patch.conversion.tiny import save_random_model, shrink_config
from megatron_patch.mapping.config import UnsupportedConfigError
from megatron_patch.models.common.architecture import (
    PatchTransformerConfig,
    add_architecture_arguments,
)
from megatron_patch.models.common.hf_config import rope_parameters
from megatron_patch.models.common.rope import HFRotaryEmbedding
from megatron_patch.models.registry import family_for_hf_config
from tests.conversion.tiny_models import ROPE_CASES, rope_config, tiny_config
from tests.launch import MOCK_DATA, REPO, TINY_MODEL, pretrain, run_module

TOLERANCE = 1e-5
LLAMA_FULL = {"architectures": ["LlamaForCausalLM"], "hidden_size": 3072,
              "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32,
              "intermediate_size": 8192, "vocab_size": 32064, "max_position_embeddings": 131072}
HF_CASES = sorted(set(ROPE_CASES) - {"llama_linear"})  # linear is Megatron-Core's own rope


def _hf_dict(case: str) -> dict:
    """``config.json`` of a rope case as ``save_pretrained`` writes it."""
    config = rope_config(case)
    return {**config.to_dict(),
            "architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]}


def _tables(case: str, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers') cos|sin of positions 0..seq-1, each from a fresh module."""
    hf = _hf_dict(case)
    rope = rope_parameters(hf)
    ours = HFRotaryEmbedding({k: v for k, v in rope.items() if k != "rope_theta"},
                             hf["max_position_embeddings"], 16, 1.0,
                             rope["rope_theta"], use_cpu_initialization=True)
    angles = ours.get_freqs_non_repeated(seq)
    angles = torch.cat((angles, angles), dim=-1)
    mine = torch.cat((angles.cos(), angles.sin()), dim=-1) * ours.attention_scaling
    cos, sin = LlamaRotaryEmbedding(rope_config(case))(torch.zeros(1),
                                                       torch.arange(seq)[None])
    return mine, torch.cat((cos[0], sin[0]), dim=-1)


@pytest.mark.parametrize("case", HF_CASES)
def test_rotary_tables_match_transformers(case):
    """Every length, including past original_max_position_embeddings (16: longrope's long
    factors) and past max_position_embeddings (64: dynamic NTK rescales)."""
    for seq in (8, 16, 17, 32, 64, 100):
        mine, theirs = _tables(case, seq)
        assert (mine - theirs).abs().max() <= 1e-6, (case, seq)


def test_length_dependent_types_switch_frequencies():
    """The cases above would pass vacuously if dynamic/longrope never left their init tables."""
    for case, short, long in (("llama_dynamic", 64, 100), ("llama_longrope", 16, 17)):
        assert not torch.equal(_tables(case, short)[0], _tables(case, long)[0][:short]), case


def _megatron_args(case: str) -> argparse.Namespace:
    hf = _hf_dict(case)
    return argparse.Namespace(**family_for_hf_config(hf).hf_to_megatron(hf))


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_config_round_trip_keeps_the_rope_dict(case):
    hf = _hf_dict(case)
    args = _megatron_args(case)
    if case == "llama_linear":
        assert args.rotary_seq_len_interpolation_factor == 2.0
    else:
        assert args.hf_rope_scaling["rope_type"] == ROPE_CASES[case][1]["rope_type"]
        assert "rope_theta" not in args.hf_rope_scaling
    back = family_for_hf_config(hf).megatron_to_hf(args)
    assert back["rope_parameters"] == rope_parameters(hf)
    assert back["rope_theta"] == rope_parameters(hf)["rope_theta"]


@pytest.mark.parametrize("family_case", ["starcoder2", "falcon_gqa", "mistral", "qwen3_moe"])
def test_other_rope_families_share_the_mapping(family_case):
    config = tiny_config(family_case)
    rope = {**ROPE_CASES["qwen2_yarn"][1], "rope_theta": 10000.0}
    hf = {**config.to_dict(), "rope_parameters": rope,
          "architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]}
    family = family_for_hf_config(hf)
    args = family.hf_to_megatron(hf)
    assert args["hf_rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert family.megatron_to_hf(argparse.Namespace(**args))["rope_parameters"] == rope


def test_llama31_constants_stay_on_megatron_rope():
    hf = {**_hf_dict("llama_llama3"), "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}}
    args = family_for_hf_config(hf).hf_to_megatron(hf)
    assert args["use_rope_scaling"] and "hf_rope_scaling" not in args


def test_top_level_original_length_wins():
    """transformers reads a top-level original_max_position_embeddings (Phi-3 style) first."""
    hf = {**_hf_dict("llama_longrope"), "original_max_position_embeddings": 32}
    assert family_for_hf_config(hf).hf_to_megatron(hf)["hf_rope_scaling"][
        "original_max_position_embeddings"] == 32


@pytest.mark.parametrize("rope, named", [
    ({"rope_type": "yarn", "original_max_position_embeddings": 16}, "needs 'factor'"),
    ({"rope_type": "dynamic"}, "needs 'factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}, "'high_freq_factor'"),
    ({"rope_type": "longrope", "long_factor": [1.0] * 8}, "'short_factor'"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 4},
     "long_factor must be a list of 8"),
    ({"rope_type": "proportional", "factor": 2.0}, "rope type 'proportional'"),
])
def test_unusable_rope_dicts_name_the_field(rope, named):
    hf = {**_hf_dict("llama_dynamic"), "rope_parameters": {"rope_theta": 10000.0, **rope}}
    with pytest.raises(UnsupportedConfigError, match=named):
        family_for_hf_config(hf).hf_to_megatron(hf)


def test_scaled_ropes_stay_off_rope_paths_without_the_scale():
    shape = {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4}
    yarn = ROPE_CASES["qwen2_yarn"][1]
    assert not PatchTransformerConfig(**shape, hf_rope_scaling=yarn,
                                      apply_rope_fusion=True).apply_rope_fusion
    with pytest.raises(ValueError, match="--fused-single-qkv-rope"):
        PatchTransformerConfig(**shape, hf_rope_scaling=yarn, fused_single_qkv_rope=True)


@pytest.mark.parametrize("value", ['{"rope_type": "yarn"', '{"rope_type": "ntk"}', '[1]'])
def test_bad_rope_flag_is_one_argparse_error(value, capsys):
    parser = argparse.ArgumentParser()
    add_architecture_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--hf-rope-scaling", value])
    assert "argument --hf-rope-scaling:" in capsys.readouterr().err


def test_tiny_copy_of_a_longrope_config_keeps_one_factor_per_frequency():
    """`card --tiny` shrinks the head: longrope's factor lists follow (48 -> 8 frequencies)."""
    full = {**LLAMA_FULL, "rope_scaling": {
        "rope_type": "longrope", "original_max_position_embeddings": 4096,
        "short_factor": [1.0 + i / 48 for i in range(48)],
        "long_factor": [2.0 + i for i in range(48)]}}
    tiny = shrink_config(full)
    assert tiny["rope_scaling"]["long_factor"] == [2.0, 8.0, 14.0, 20.0, 26.0, 32.0, 38.0, 44.0]
    scaling = family_for_hf_config(tiny).hf_to_megatron(tiny)["hf_rope_scaling"]
    assert len(scaling["short_factor"]) == 8 and shrink_config(tiny) == tiny


def test_llava_refuses_rope_variants():
    text = {**_hf_dict("qwen2_yarn"), "architectures": ["Qwen2ForCausalLM"]}
    llava = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
             "text_config": text, "vision_config": {
                 "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                 "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 28,
                 "patch_size": 14, "projection_dim": 32}, "image_token_index": 3}
    with pytest.raises(UnsupportedConfigError, match="rope type 'yarn'"):
        family_for_hf_config(llava).hf_to_megatron(llava)


@pytest.fixture(scope="module")
def rope_models(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """case -> (HF dir, torch_dist checkpoint converted at TP=1)."""
    root = tmp_path_factory.mktemp("rope")
    models = {}
    for case in ROPE_CASES:
        hf = save_random_model(rope_config(case), root / case, torch.float32, 0)
        models[case] = str(hf), str(convert_hf_to_mcore(hf, root / f"{case}-mcore",
                                                        progress=False))
    return models


# (case, tp, pp, seq, extra Megatron flags): every type at TP=1; yarn (cos/sin scaled) at TP=2
# with sequence parallelism and PP=2; longrope on both sides of original_max_position_embeddings
# (16) and at TP=2.
PARITY = [(case, 1, 1, 32, []) for case in sorted(ROPE_CASES)] + [
    ("llama_longrope", 1, 1, 8, []),
    ("qwen2_yarn", 2, 1, 32, ["--sequence-parallel"]),
    ("qwen2_yarn", 1, 2, 32, []),
    ("llama_longrope", 2, 1, 32, []),
]


@pytest.mark.distributed
def test_logits_match_hf(rope_models, tmp_path):
    cases = [{"id": f"{case}-tp{tp}-pp{pp}-seq{seq}{'-' + '-'.join(extra) if extra else ''}",
              "hf": rope_models[case][0], "mcore": rope_models[case][1], "tp": tp, "pp": pp,
              "seq": seq, "extra": extra} for case, tp, pp, seq, extra in PARITY]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_module("tests.conversion.parity_worker", [str(tmp_path / "cases.json"),
                                                  str(tmp_path / "out.json")], nproc=2,
               timeout=1200)
    results = json.loads((tmp_path / "out.json").read_text())
    print("\n".join(f"  {case:48s} {diff:.3e}" for case, diff in results.items()))
    assert sorted(results) == sorted(c["id"] for c in cases)
    assert all(diff <= TOLERANCE for diff in results.values()), results


@pytest.mark.distributed
def test_context_parallel_training_matches_single_process():
    """CP=2 slices the rotary table of the whole sequence: the losses of CP=1 (``--hf-rope-scaling``
    given as JSON on the command line, longrope's long factors and attention factor)."""
    rope = ROPE_CASES["llama_longrope"][1]
    train = TINY_MODEL + MOCK_DATA + [
        "--hf-rope-scaling", json.dumps(rope), "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "2", "--log-interval", "1",
        "--eval-iters", "0", "--seed", "11"]
    reference = pretrain(train, nproc=1)
    got = pretrain(train + ["--context-parallel-size", "2"], nproc=2)
    assert got.keys() == reference.keys()
    for iteration, loss in reference.items():
        assert got[iteration] == pytest.approx(loss, rel=1e-5), (iteration, got, reference)


def _cli(*args: str) -> subprocess.CompletedProcess:
    bindir = os.path.dirname(sys.executable)
    return subprocess.run([os.path.join(bindir, "megatron-patch"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.distributed
def test_public_commands_on_a_yarn_model(tmp_path):
    """`megatron-patch convert hf-to-mcore` then `verify` (TP=2) on a Qwen2.5-style yarn model."""
    hf = save_random_model(rope_config("qwen2_yarn"), tmp_path / "hf", torch.float32, 1)
    out = tmp_path / "mcore"
    convert = _cli("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(out))
    assert convert.returncode == 0, convert.stdout + convert.stderr[-3000:]
    verify = _cli("verify", "--hf-dir", str(hf), "--mcore-dir", str(out), "--tp", "2",
                  "--seq-length", "32")
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr[-3000:]
