"""Mixture-of-experts families at expert parallelism, their conversion layouts and training.

test_parity.py and test_roundtrip.py already check every MoE case of ``tiny_models.MOE_CASES``
at EP=1 (logits at TP/PP 1 and 2, bit-identical round trips). Here: logits at EP=2 with TP,
PP and an expert TP different from TP (one torchrun launch of 4 gloo processes), a legacy
checkpoint written for EP=2 loaded by Megatron's own loader, refused layouts, DeepSeek's
multi-token-prediction tensors, and a converted MoE training with EP=2.
"""

import json
import re
import shutil

import pytest
import torch
import transformers

from megatron_patch.conversion import ConversionError, convert_hf_to_mcore, convert_mcore_to_hf
from megatron_patch.conversion.verify.logits import world_size
from tests.conversion.test_roundtrip import assert_identical
from tests.conversion.tiny_models import MOE_CASES, read_safetensors
from tests.launch import losses, run_module

TOLERANCE = 1e-4
# case -> (TP, PP, EP, ETP) layouts at EP=2; together they cover EP with TP=2 (ETP=2 and ETP=1)
# and with PP=2 for the softmax, sigmoid/MLA and dense-first-layer models.
EP_LAYOUTS = {
    "qwen2_moe": [(1, 1, 2, None), (2, 1, 2, 1)],
    "mixtral": [(1, 1, 2, None), (1, 2, 2, None)],
    "qwen3_moe": [(2, 1, 2, None)],
    "deepseek_v3": [(1, 1, 2, None), (2, 1, 2, 1), (1, 2, 2, None)],
    "deepseek_v2_lite": [(2, 1, 2, None), (1, 2, 2, None)],
}


def _layout_id(case: str, tp: int, pp: int, ep: int, etp: int | None) -> str:
    return f"{case}-tp{tp}-pp{pp}-ep{ep}" + (f"-etp{etp}" if etp else "")


@pytest.fixture(scope="module")
def parity(hf_models, converted, tmp_path_factory) -> dict[str, float]:
    tmp = tmp_path_factory.mktemp("moe-parity")
    cases = [{"id": _layout_id(case, tp, pp, ep, etp), "hf": str(hf_models[case]),
              "mcore": str(converted[case]), "tp": tp, "pp": pp, "ep": ep, "etp": etp}
             for case, layouts in EP_LAYOUTS.items() for tp, pp, ep, etp in layouts]
    legacy = convert_hf_to_mcore(hf_models["mixtral"], tmp / "mixtral-legacy", ep=2,
                                 ckpt_format="legacy", progress=False)
    cases += [
        {"id": "mixtral-legacy-ep2", "hf": str(hf_models["mixtral"]), "mcore": str(legacy),
         "tp": 1, "pp": 1, "ep": 2},
        {"id": "deepseek_v3-from-hf-weights-tp2-ep2-etp1", "hf": str(hf_models["deepseek_v3"]),
         "tp": 2, "pp": 1, "ep": 2, "etp": 1},
    ]
    (tmp / "cases.json").write_text(json.dumps(cases))
    run_module("tests.conversion.parity_worker", [str(tmp / "cases.json"),
                                                  str(tmp / "results.json")], nproc=4)
    results = json.loads((tmp / "results.json").read_text())
    print("\nmax abs logits diff per case:\n" + "\n".join(
        f"  {case:44s} {diff:.3e}" for case, diff in results.items()))
    assert sorted(results) == sorted(c["id"] for c in cases)
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(EP_LAYOUTS) + ["mixtral-legacy", "deepseek_v3-from-hf"])
def test_expert_parallel_logits_match_hf(parity, case):
    mine = {layout: diff for layout, diff in parity.items() if layout.startswith(case + "-")}
    assert mine, case
    assert all(diff <= TOLERANCE for diff in mine.values()), mine


def test_every_moe_case_has_expert_parallel_layouts():
    assert set(EP_LAYOUTS) == MOE_CASES


def test_legacy_expert_parallel_layout_round_trips(hf_models, tmp_path):
    """Legacy files per (TP, PP, EP) rank hold their EP rank's experts; HF -> Megatron -> HF
    is bit-identical (MLA, a dense first layer, the expert bias and shared experts included)."""
    mcore = convert_hf_to_mcore(hf_models["deepseek_v3"], tmp_path / "m", tp=2, pp=2, ep=2,
                                ckpt_format="legacy", progress=False)
    ranks = sorted(p.name for p in (mcore / "release").iterdir())
    assert ranks == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2)
                     for e in range(2)]
    shard = torch.load(mcore / "release" / "mp_rank_00_001_001" / "model_optim_rng.pt",
                       weights_only=False)["model"]
    experts = {int(m.group(1)) for name in shard
               if (m := re.search(r"local_experts\.(\d+)\.", name))}
    assert experts == {0, 1, 2, 3}  # experts 4..7 of 8, numbered locally
    back = convert_mcore_to_hf(mcore, tmp_path / "hf", progress=False)
    assert_identical(read_safetensors(hf_models["deepseek_v3"]), read_safetensors(back))


@pytest.mark.parametrize("kwargs, message", [
    ({"ep": 3}, "--ep 3 must divide the 4 routed experts"),
    ({"etp": 2, "tp": 1, "ckpt_format": "legacy"}, "--etp 2 differs from --tp 1"),
    ({"etp": 3}, "expert tensor parallel size 3 must divide the expert FFN size"),
])
def test_expert_layouts_megatron_cannot_run_are_refused(hf_models, tmp_path, kwargs, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert_hf_to_mcore(hf_models["qwen2_moe"], tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="need a mixture-of-experts model"):
        convert_hf_to_mcore(hf_models["qwen3"], tmp_path / "dense", ep=2, progress=False)


@pytest.mark.parametrize("case, fields, named", [
    ("deepseek_v3", {"topk_group": 1}, "group-limited routing with n_group=4, topk_group=1"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob=False"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v3", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}},
     "beta_fast"),
    ("deepseek_v2_lite", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
     "HF by its top 1"),
    ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok=1"),
    ("qwen2_moe", {"mlp_only_layers": [0, 1, 2, 3]}, "no layer has routed experts"),
])
def test_router_settings_megatron_cannot_reproduce_name_the_field(hf_models, case, fields, named):
    from megatron_patch.mapping.config import UnsupportedConfigError
    from megatron_patch.models.common.hf_config import load_hf_config
    from megatron_patch.models.registry import family_for_hf_config

    hf = {**load_hf_config(hf_models[case]), **fields}
    with pytest.raises(UnsupportedConfigError, match=re.escape(named)):
        family_for_hf_config(hf).hf_to_megatron(hf)


def test_world_size_tiles_dense_and_expert_layouts():
    assert world_size(tp=2, pp=1, ep=2) == 4  # ETP defaults to TP
    assert world_size(tp=2, pp=1, ep=2, etp=1) == 2
    assert world_size(tp=1, pp=2, ep=2) == 4


def test_multi_token_prediction_layers_are_dropped_with_a_warning(hf_models, tmp_path):
    source = hf_models["deepseek_v3"]
    mtp = tmp_path / "with-mtp"
    shutil.copytree(source, mtp)
    config = json.loads((mtp / "config.json").read_text())
    (mtp / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    extra = {f"model.layers.{config['num_hidden_layers']}.{name}": torch.ones(4)
             for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight")}
    from safetensors.torch import save_file

    save_file(extra, str(mtp / "mtp.safetensors"))
    index = json.loads((mtp / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(extra, "mtp.safetensors"))
    (mtp / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="3 tensors are not converted.*multi-token-prediction"):
        mcore = convert_hf_to_mcore(mtp, tmp_path / "m", progress=False)
    back = convert_mcore_to_hf(mcore, tmp_path / "hf", progress=False)
    assert_identical(read_safetensors(source), read_safetensors(back))


@torch.no_grad()
def test_deepseek_case_exercises_the_expert_bias(hf_models):
    """The tiny V3's ``e_score_correction_bias`` changes which experts are picked, so the
    parity checks above would fail if it were dropped or misplaced."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_models["deepseek_v3"])
    tokens = torch.randint(0, model.config.vocab_size, (2, 32),
                           generator=torch.Generator().manual_seed(0))
    with_bias = model(tokens).logits
    for layer in model.model.layers[model.config.first_k_dense_replace:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    assert (model(tokens).logits - with_bias).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transformer_engine_experts_match_hf(hf_models, converted, tmp_path):
    """On a GPU with Transformer Engine: its layer specs (MLA's fused latent norms included)
    with sequential experts and with ``--moe-grouped-gemm`` give HF's logits."""
    from megatron_patch.runtime.backends import available_backends

    if not available_backends().transformer_engine:
        pytest.skip("needs Transformer Engine")
    cases = [{"id": f"{case}-{'grouped' if grouped else 'sequential'}",
              "hf": str(hf_models[case]), "mcore": str(converted[case]), "tp": 1, "pp": 1,
              "extra": ["--moe-grouped-gemm"] if grouped else []}
             for case in ("qwen2_moe", "deepseek_v3", "deepseek_v2_lite")
             for grouped in (False, True)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run_module("tests.conversion.parity_worker", [str(tmp_path / "cases.json"),
                                                  str(tmp_path / "results.json")], nproc=1)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == sorted(c["id"] for c in cases)
    assert all(diff <= TOLERANCE for diff in results.values()), results


TRAIN = ["--dataset", "mock", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "6", "--log-interval", "1",
         "--eval-iters", "0", "--seed", "7", "--lr", "3e-3", "--attention-dropout", "0",
         "--hidden-dropout", "0"]


@pytest.mark.distributed
def test_converted_moe_trains_with_expert_parallelism(converted):
    """Qwen2-MoE (gated shared expert, a dense layer) from its converted checkpoint, EP=2 over
    2 gloo ranks: the loss falls and the router's load-balancing loss is logged each step."""
    result = run_module("megatron_patch.training.pretrain",
                        [*TRAIN, "--load", str(converted["qwen2_moe"]),
                         "--expert-model-parallel-size", "2"], nproc=2)
    found = losses(result.stdout)
    balance = [float(v) for v in re.findall(r" load_balancing_loss: ([0-9.E+-]+) \|",
                                              result.stdout)]
    print(f"\nEP=2 training: lm loss {found}, load_balancing_loss {balance}")
    assert sorted(found) == list(range(1, 7)) and found[6] < found[1], found
    assert len(balance) == 6 and all(v > 0 for v in balance), result.stdout[-2000:]
