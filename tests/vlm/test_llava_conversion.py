"""LLaVA: HF -> Megatron -> HF is bit-identical; Megatron logits equal transformers' on
image+text inputs at TP/PP 1 and 2; the freezing flags stop exactly the named parts' gradients;
unsupported configs are refused naming the field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_patch.conversion import ConversionError, convert_hf_to_mcore, convert_mcore_to_hf
from megatron_patch.mapping.config import UnsupportedConfigError
from megatron_patch.models.llava import hf_to_megatron
from tests.conversion.tiny_models import read_safetensors
from tests.vlm.conftest import VARIANTS
from tests.vlm.tiny_vlms import llava_config, run_worker_cases

TOLERANCE = 1e-5
# flags -> which of (language model, vision tower, projector) still train
FREEZING = {
    "none": ([], (True, True, True)),
    "vit": (["--freeze-ViT"], (True, False, True)),
    "lm-projector": (["--freeze-LM", "--freeze-projector"], (False, True, False)),
}


def assert_identical(expected: dict, got: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_roundtrip_is_bit_identical(llava_models, llava_converted, tmp_path, variant):
    back = convert_mcore_to_hf(llava_converted[variant], tmp_path / "hf", progress=False)
    assert_identical(read_safetensors(llava_models[variant]), read_safetensors(back))
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"] == \
        json.loads((llava_models[variant] / "config.json").read_text())["vision_config"]


def test_unused_tensors_kept_beside_the_checkpoint(llava_models, llava_converted, tmp_path):
    """The never-read layer -1 and post_layernorm travel in hf_unused.safetensors; without it
    export takes them from --hf-template, or fails naming the file."""
    unused = load_file(llava_converted["default"] / "hf_unused.safetensors")
    assert any(".encoder.layers.2." in n for n in unused)
    assert any("post_layernorm" in n for n in unused)
    assert not any(".encoder.layers.1." in n for n in unused)
    bare = tmp_path / "bare"
    shutil.copytree(llava_converted["default"], bare)
    (bare / "hf_unused.safetensors").unlink()
    back = convert_mcore_to_hf(bare, tmp_path / "t", hf_template=llava_models["default"],
                               progress=False)
    assert_identical(read_safetensors(llava_models["default"]), read_safetensors(back))
    with pytest.raises(ConversionError, match="hf_unused.safetensors"):
        convert_mcore_to_hf(bare, tmp_path / "none", progress=False)


def test_older_transformers_names_convert(llava_models, tmp_path):
    """Checkpoints saved with ``vision_tower.vision_model.`` (llava-hf on the Hub) convert and
    export under the same names."""
    source = tmp_path / "hub"
    shutil.copytree(llava_models["default"], source)
    for file in source.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({n.replace("vision_tower.", "vision_tower.vision_model."): t
                   for n, t in tensors.items()}, file, metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("vision_tower.", "vision_tower.vision_model."))
    back = convert_mcore_to_hf(convert_hf_to_mcore(source, tmp_path / "m", progress=False),
                               tmp_path / "h", progress=False)
    assert_identical(read_safetensors(source), read_safetensors(back))


def test_missing_tensor_is_named(llava_models, tmp_path):
    source = tmp_path / "broken"
    shutil.copytree(llava_models["default"], source)
    for file in source.glob("*.safetensors"):
        tensors = load_file(file)
        tensors.pop("multi_modal_projector.linear_2.bias", None)
        save_file(tensors, file, metadata={"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    del index["weight_map"]["multi_modal_projector.linear_2.bias"]
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="multi_modal_projector.linear_2.bias"):
        convert_hf_to_mcore(source, tmp_path / "m", progress=False)


def test_text_only_layout_options_are_refused(llava_models, tmp_path):
    with pytest.raises(ConversionError, match="--vpp: not supported for vision-language"):
        convert_hf_to_mcore(llava_models["default"], tmp_path / "m", pp=2, vpp=2,
                            progress=False)
    with pytest.raises(ConversionError, match="torch_dist only"):
        convert_hf_to_mcore(llava_models["default"], tmp_path / "m", ckpt_format="legacy",
                            progress=False)


@pytest.mark.parametrize("field, value", [("vision_feature_layer", [-2, -1]),
                                          ("vision_feature_select_strategy", "cls"),
                                          ("projector_hidden_act", "relu")])
def test_unsupported_config_names_the_field(field, value):
    config = llava_config().to_dict()
    config[field] = value
    with pytest.raises(UnsupportedConfigError, match=field):
        hf_to_megatron(config)


def test_siglip_without_class_token_refuses_default_strategy():
    config = llava_config(vision="siglip").to_dict()  # strategy "default" drops a patch
    with pytest.raises(UnsupportedConfigError, match="vision_feature_select_strategy"):
        hf_to_megatron(config)


@pytest.fixture(scope="module")
def parity(llava_models, llava_converted, tmp_path_factory) -> dict[str, float]:
    """All parity cases in one 2-rank torchrun launch (TP*PP*DP = 2)."""
    tmp = tmp_path_factory.mktemp("llava-parity")
    wrong = tmp / "wrong-vision"  # the reference with one vision weight changed
    shutil.copytree(llava_models["default"], wrong)
    for file in wrong.glob("*.safetensors"):
        tensors = load_file(file)
        name = "vision_tower.encoder.layers.1.self_attn.q_proj.weight"
        if name in tensors:
            tensors[name] = tensors[name] * 1.5
            save_file(tensors, file, metadata={"format": "pt"})
    cases = [{"id": f"{v}-tp{tp}-pp{pp}", "hf": str(llava_models[v]),
              "mcore": str(llava_converted[v]), "tp": tp, "pp": pp}
             for v in sorted(VARIANTS) for tp, pp in ((1, 1), (2, 1), (1, 2))]
    cases.append({"id": "wrong-vision", "hf": str(wrong), "mcore":
                  str(llava_converted["default"]), "tp": 1, "pp": 1})
    cases += [{"id": f"freeze-{name}", "hf": str(llava_models["default"]),
               "mcore": str(llava_converted["default"]), "tp": 2, "freeze": flags}
              for name, (flags, _) in FREEZING.items()]
    return run_worker_cases(cases, tmp)


@pytest.mark.distributed
@pytest.mark.parametrize("case", [f"{v}-tp{tp}-pp{pp}" for v in sorted(VARIANTS)
                                  for tp, pp in ((1, 1), (2, 1), (1, 2))])
def test_logits_match_transformers(parity, case):
    assert parity[case] <= TOLERANCE, f"{case}: max abs logits diff {parity[case]:.3e}"


@pytest.mark.distributed
def test_parity_detects_a_wrong_vision_weight(parity):
    assert parity["wrong-vision"] > 1e-2


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(FREEZING))
def test_freezing_flags(parity, name):
    """At TP=2, frozen parts have no trainable parameter and no gradient; the others have
    non-zero gradients from the LM loss on image+text."""
    parts = parity[f"freeze-{name}"]
    expected = FREEZING[name][1]
    for part, trains in zip(("language_model", "vision_model", "vision_projection"), expected):
        assert parts[part] == [trains, trains], (part, parts[part])
