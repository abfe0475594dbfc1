"""Qwen2-VL / Qwen2.5-VL: HF -> Megatron -> HF is bit-identical (both transformers naming
schemes, tied and untied embeddings, also through Megatron's own save at TP/PP 2); Megatron
logits equal transformers' on two rows with
three images of different sizes at TP/PP 1 and 2 (and TP=2 with sequence parallelism); a wrong
vision weight and a broken mapping rule are caught; the freezing flags stop exactly the named
parts' gradients; a token/image count mismatch is an error."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megatron_patch.conversion import ConversionError, convert_hf_to_mcore, convert_mcore_to_hf
from megatron_patch.models import qwen2_vl
from tests.conversion.tiny_models import read_safetensors
from tests.vlm.test_llava_conversion import assert_identical
from tests.vlm.tiny_vlms import run_worker_cases, save_tiny_qwen_vl

TOLERANCE = 1e-5
# kind -> tied embeddings (Qwen2-VL-2B ties them; the larger models do not)
KINDS = {"qwen2_vl": True, "qwen2_5_vl": False}
LAYOUTS = ((1, 1), (2, 1), (1, 2))
# flags -> which of (language model, vision tower, merger) still train
FREEZING = {
    "none": ([], (True, True, True)),
    "vit": (["--freeze-ViT"], (True, False, True)),
    "lm-projector-sp": (["--freeze-LM", "--freeze-projector", "--sequence-parallel"],
                        (False, True, False)),
}


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory) -> dict:
    """kind -> HF model directory (fp32; transformers saves the older tensor names)."""
    root = tmp_path_factory.mktemp("qwen-vl")
    return {kind: save_tiny_qwen_vl(root / kind, kind, tie) for kind, tie in KINDS.items()}


@pytest.fixture(scope="module")
def qwen_converted(qwen_models, tmp_path_factory) -> dict:
    """kind -> torch_dist checkpoint."""
    root = tmp_path_factory.mktemp("qwen-vl-mcore")
    return {kind: convert_hf_to_mcore(path, root / kind, progress=False)
            for kind, path in qwen_models.items()}


def _rewrite(source, out, rename=lambda n: n, change=lambda name, tensor: tensor, drop=()):
    """A copy of the HF directory ``source`` with tensors renamed, changed or dropped."""
    shutil.copytree(source, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({rename(n): change(n, t) for n, t in tensors.items() if n not in drop}, file,
                  metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {rename(n): f for n, f in data["weight_map"].items() if n not in drop}
    index.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_roundtrip_is_bit_identical(qwen_models, qwen_converted, tmp_path, kind):
    back = convert_mcore_to_hf(qwen_converted[kind], tmp_path / "hf", progress=False)
    assert_identical(read_safetensors(qwen_models[kind]), read_safetensors(back))
    config = json.loads((back / "config.json").read_text())
    assert config["vision_config"] == \
        json.loads((qwen_models[kind] / "config.json").read_text())["vision_config"]
    assert ("lm_head.weight" in read_safetensors(back)) != KINDS[kind]


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_roundtrip_at_layouts(qwen_models, tmp_path, tp, pp):
    mcore = convert_hf_to_mcore(qwen_models["qwen2_5_vl"], tmp_path / "m", tp=tp, pp=pp,
                                progress=False)
    assert json.loads((mcore / "megatron_patch.json").read_text())["layout"] == \
        {"tp": tp, "pp": pp}
    back = convert_mcore_to_hf(mcore, tmp_path / "hf", progress=False)
    assert_identical(read_safetensors(qwen_models["qwen2_5_vl"]), read_safetensors(back))


def _transformers5_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") \
        else name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_transformers5_names_convert(qwen_models, tmp_path, kind):
    """``model.visual.*`` / ``model.language_model.*`` (transformers 5's module names, which it
    also loads) convert and export under the same names."""
    source = _rewrite(qwen_models[kind], tmp_path / "v5", rename=_transformers5_name)
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(source).state_dict()
    tensors = read_safetensors(source)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    back = convert_mcore_to_hf(convert_hf_to_mcore(source, tmp_path / "m", progress=False),
                               tmp_path / "h", progress=False)
    assert_identical(tensors, read_safetensors(back))


def test_missing_tensor_is_named(qwen_models, tmp_path):
    source = _rewrite(qwen_models["qwen2_vl"], tmp_path / "broken",
                      drop=("visual.merger.mlp.2.bias",))
    with pytest.raises(ConversionError, match="visual.merger.mlp.2.bias"):
        convert_hf_to_mcore(source, tmp_path / "m", progress=False)


def _resave_cases(models: dict, converted: dict, tmp, layouts, kinds=tuple(KINDS)
                  ) -> list[dict]:
    """Worker cases loading each checkpoint at a layout and saving it again."""
    return [{"id": f"resave-{k}-tp{tp}-pp{pp}", "hf": str(models[k]), "mcore": str(converted[k]),
             "tp": tp, "pp": pp, "save": str(tmp / f"resave-{k}-tp{tp}-pp{pp}")}
            for k in kinds for tp, pp in layouts]


def _assert_resaved_identical(models: dict, results: dict, tmp) -> None:
    """Each checkpoint Megatron saved at a TP/PP layout exports bit-identically."""
    resaved = {case: path for case, path in results.items() if case.startswith("resave-")}
    assert resaved
    for case, path in resaved.items():
        kind = case.split("-")[1]
        back = convert_mcore_to_hf(path, tmp / f"{case}-hf", hf_template=models[kind],
                                   progress=False)
        assert_identical(read_safetensors(models[kind]), read_safetensors(back))


@pytest.fixture(scope="module")
def parity(qwen_models, qwen_converted, tmp_path_factory) -> dict:
    """All two-rank cases in one torchrun launch (TP*PP*DP = 2)."""
    tmp = tmp_path_factory.mktemp("qwen-vl-parity")
    wrong = _rewrite(  # the reference with one vision weight changed
        qwen_models["qwen2_5_vl"], tmp / "wrong-vision",
        change=lambda n, t: t * 1.5 if n == "visual.blocks.0.attn.qkv.weight" else t)
    swapped = {"gate": "mlp.up_proj", "up": "mlp.gate_proj", "fc2": "mlp.down_proj"}
    with pytest.MonkeyPatch.context() as patch:  # a mapping rule with gate and up swapped
        patch.setitem(qwen2_vl._MLP_NAMES, "qwen2_5_vl", swapped)
        broken = convert_hf_to_mcore(qwen_models["qwen2_5_vl"], tmp / "broken-rule",
                                     progress=False)
    cases = [{"id": f"{k}-tp{tp}-pp{pp}", "hf": str(qwen_models[k]),
              "mcore": str(qwen_converted[k]), "tp": tp, "pp": pp}
             for k in sorted(KINDS) for tp, pp in LAYOUTS]
    cases += [
        {"id": "qwen2_5_vl-tp2-sp", "hf": str(qwen_models["qwen2_5_vl"]),
         "mcore": str(qwen_converted["qwen2_5_vl"]), "tp": 2, "pp": 1,
         "args": ["--sequence-parallel"]},
        {"id": "wrong-vision", "hf": str(wrong), "mcore": str(qwen_converted["qwen2_5_vl"]),
         "tp": 1, "pp": 1},
        {"id": "broken-rule", "hf": str(qwen_models["qwen2_5_vl"]), "mcore": str(broken),
         "tp": 1, "pp": 1},
        {"id": "mismatch", "hf": str(qwen_models["qwen2_vl"]),
         "mcore": str(qwen_converted["qwen2_vl"]), "mismatch": True},
    ]
    cases += [{"id": f"freeze-{name}", "hf": str(qwen_models["qwen2_5_vl"]),
               "mcore": str(qwen_converted["qwen2_5_vl"]), "tp": 2, "freeze": flags}
              for name, (flags, _) in FREEZING.items()]
    cases += _resave_cases(qwen_models, qwen_converted, tmp, ((2, 1), (1, 2)))
    return run_worker_cases(cases, tmp)


@pytest.mark.distributed
@pytest.mark.parametrize("case", [f"{k}-tp{tp}-pp{pp}" for k in sorted(KINDS)
                                  for tp, pp in LAYOUTS] + ["qwen2_5_vl-tp2-sp"])
def test_logits_match_transformers(parity, case):
    assert parity[case] <= TOLERANCE, f"{case}: max abs logits diff {parity[case]:.3e}"


@pytest.mark.distributed
def test_megatron_saves_at_tp2_and_pp2_export_bit_identically(qwen_models, parity, tmp_path):
    """Loaded at TP=2 or PP=2 and saved by Megatron (the vision tower on the first stage), the
    checkpoint exports to the original HF tensors."""
    _assert_resaved_identical(qwen_models, parity, tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["wrong-vision", "broken-rule"])
def test_parity_detects_wrong_weights_and_rules(parity, case):
    assert parity[case] > 1e-2, parity[case]


@pytest.mark.distributed
def test_image_count_mismatch_is_an_error(parity):
    assert "image tokens" in parity["mismatch"] and "embeddings" in parity["mismatch"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(FREEZING))
def test_freezing_flags(parity, name):
    """At TP=2, frozen parts have no trainable parameter and no gradient; the others have
    non-zero gradients from the LM loss on image+text."""
    parts = parity[f"freeze-{name}"]
    for part, trains in zip(("language_model", "vision_model", "vision_projection"),
                            FREEZING[name][1]):
        assert parts[part] == [trains, trains], (part, parts[part])


@pytest.mark.distributed
def test_tp2_pp2(qwen_models, qwen_converted, tmp_path):
    """Both dimensions at once (four ranks; Qwen2.5-VL, whose tower has more parts): logits
    parity, and Megatron's save exports bit-identically."""
    kind = "qwen2_5_vl"
    cases = [{"id": "parity", "hf": str(qwen_models[kind]), "mcore": str(qwen_converted[kind]),
              "tp": 2, "pp": 2},
             *_resave_cases(qwen_models, qwen_converted, tmp_path, ((2, 2),), kinds=(kind,))]
    results = run_worker_cases(cases, tmp_path, nproc=4)
    assert results["parity"] <= TOLERANCE, f"max abs logits diff {results['parity']:.3e}"
    _assert_resaved_identical(qwen_models, results, tmp_path)
