"""HF -> Megatron -> HF is bit-identical for every family, format and layout; loading is strict."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_patch.arguments import model_defaults_from_argv
from megatron_patch.conversion import ConversionError, convert_hf_to_mcore, convert_mcore_to_hf
from megatron_patch.conversion.cli.convert import main as convert_cli
from megatron_patch.utils.metadata import checkpoint_metadata
from tests.conversion.conftest import TOKENIZER_SIZE
from tests.conversion.tiny_models import (
    CASES,
    FEW_LAYOUTS,
    MQA_CASES,
    read_safetensors,
    save_tiny_model,
)

LAYOUTS = {  # id -> convert_hf_to_mcore keyword arguments
    "dist": {},
    "dist-tp2": {"tp": 2},
    "legacy": {"ckpt_format": "legacy"},
    "legacy-tp2-pp2": {"ckpt_format": "legacy", "tp": 2, "pp": 2},
    "legacy-pp2-vpp2": {"ckpt_format": "legacy", "pp": 2, "vpp": 2},
    "legacy-pp2-first1": {"ckpt_format": "legacy", "pp": 2,
                          "decoder_first_pipeline_num_layers": 1},
}


def assert_identical(expected: dict, got: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _layouts(case):
    if case in FEW_LAYOUTS:
        return ["dist", "legacy-tp2-pp2"] + (["dist-tp2"] if case in MQA_CASES else [])
    return list(LAYOUTS)


@pytest.mark.parametrize("case, layout", [(c, lay) for c in sorted(CASES) for lay in _layouts(c)])
def test_roundtrip_is_bit_identical(hf_models, tmp_path, case, layout):
    mcore = convert_hf_to_mcore(hf_models[case], tmp_path / "mcore", progress=False,
                                **LAYOUTS[layout])
    back = convert_mcore_to_hf(mcore, tmp_path / "hf", progress=False)
    assert_identical(read_safetensors(hf_models[case]), read_safetensors(back))


def test_bf16_stays_bf16_and_fp32_survives_a_bf16_checkpoint(tmp_path):
    bf16 = save_tiny_model("qwen3", tmp_path / "bf16", dtype=torch.bfloat16)
    back = convert_mcore_to_hf(convert_hf_to_mcore(bf16, tmp_path / "m1", progress=False),
                               tmp_path / "h1", progress=False)
    assert_identical(read_safetensors(bf16), read_safetensors(back))
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = save_tiny_model("qwen3", tmp_path / "fp32")
    mcore = convert_hf_to_mcore(fp32, tmp_path / "m2", dtype="bf16", progress=False)
    assert checkpoint_metadata(mcore)["dtype"] == "bfloat16"
    back = convert_mcore_to_hf(mcore, tmp_path / "h2", progress=False)  # back to the HF fp32
    expected = {k: v.to(torch.bfloat16).float() for k, v in read_safetensors(fp32).items()}
    assert_identical(expected, read_safetensors(back))


def test_files_metadata_and_hf_loading(hf_models, converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mcore = converted["llama3"]
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (mcore / "release" / "metadata.json").is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (mcore / name).is_file(), name
    meta = checkpoint_metadata(mcore)
    assert meta["family"] == "llama" and meta["checkpoint_format"] == "torch_dist"
    assert meta["hf_vocab_rows"] == meta["vocab_rows"] == 251
    assert meta["tokenizer_vocab_size"] == TOKENIZER_SIZE
    assert meta["padded_vocab_size"] == 256  # 251 rows, divisible by 128 * TP=1
    assert meta["layout"]["tp"] == 1 and meta["hf_config"] == json.loads(
        (hf_models["llama3"] / "config.json").read_text())
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "rotary_base", "use_rope_scaling",
                "normalization", "untie_embeddings_and_output_weights", "add_qkv_bias",
                "qk_layernorm"):
        assert key in meta["megatron_args"], key
    # `--load M` gives training the architecture (arguments.model_defaults_from_argv).
    defaults = model_defaults_from_argv(["--load", str(mcore)])
    assert defaults["model_family"] == "llama" and defaults["num_layers"] == 4

    back = convert_mcore_to_hf(mcore, tmp_path / "hf", max_shard_size="20KB", progress=False)
    assert (back / "model.safetensors.index.json").is_file()
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((back / "config.json").read_text()) == meta["hf_config"]
    model = AutoModelForCausalLM.from_pretrained(back)
    assert model.config.tie_word_embeddings and model.config.vocab_size == 251
    assert len(AutoTokenizer.from_pretrained(back)) == TOKENIZER_SIZE


def test_extra_vocab_rows_are_kept_and_padding_stripped(hf_models, tmp_path):
    mcore = convert_hf_to_mcore(hf_models["llama3"], tmp_path / "mcore", tp=2,
                                extra_vocab_size=20, make_vocab_size_divisible_by=1,
                                progress=False)
    meta = checkpoint_metadata(mcore)
    assert meta["vocab_rows"] == TOKENIZER_SIZE + 20 and meta["padded_vocab_size"] == 260
    back = read_safetensors(convert_mcore_to_hf(mcore, tmp_path / "hf", progress=False))
    original = read_safetensors(hf_models["llama3"])
    embedding = back.pop("model.embed_tokens.weight")
    assert embedding.shape[0] == 260 and not embedding[251:].any()
    assert torch.equal(embedding[:251], original.pop("model.embed_tokens.weight"))
    assert_identical(original, back)


def test_vocab_padding_follows_tp_and_divisor(hf_models, tmp_path):
    mcore = convert_hf_to_mcore(hf_models["qwen2"], tmp_path / "m", tp=2,
                                make_vocab_size_divisible_by=1, progress=False)
    assert checkpoint_metadata(mcore)["padded_vocab_size"] == 252  # 251 rows, divisible by 2


def _rewrite_shard(model_dir, edit):
    shard = sorted(model_dir.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = model_dir / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != shard.name}
    data["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index.write_text(json.dumps(data))


def test_missing_hf_tensor_is_named_and_nothing_is_written(hf_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_models["llama_mqa"], broken)
    _rewrite_shard(broken, lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(ConversionError, match="missing 'model.embed_tokens.weight'"):
        convert_hf_to_mcore(broken, tmp_path / "out", progress=False)
    assert not any(p.name.startswith(".out") or p.name == "out" for p in tmp_path.iterdir())


def test_unexpected_hf_tensor_is_named(hf_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_models["llama_mqa"], broken)
    _rewrite_shard(broken, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match="unexpected 'model.extra.weight'"):
        convert_hf_to_mcore(broken, tmp_path / "out", progress=False)


def test_unexpected_checkpoint_tensor_is_named(converted, tmp_path):
    """A Qwen3 checkpoint read as Llama (no q/k norms) has tensors the model lacks."""
    mcore = tmp_path / "mcore"
    shutil.copytree(converted["qwen3"], mcore)
    meta = checkpoint_metadata(mcore)
    (mcore / "megatron_patch.json").write_text(json.dumps({**meta, "family": "llama"}))
    with pytest.raises(ConversionError, match="self_attention.q_layernorm.weight"):
        convert_mcore_to_hf(mcore, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_missing_legacy_tensor_is_named(hf_models, tmp_path):
    mcore = convert_hf_to_mcore(hf_models["mistral"], tmp_path / "m", ckpt_format="legacy",
                                progress=False)
    file = mcore / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(file, weights_only=False)
    del state["model"]["decoder.layers.2.mlp.linear_fc2.weight"]
    torch.save(state, file)
    with pytest.raises(ConversionError, match="decoder.layers.2.mlp.linear_fc2.weight"):
        convert_mcore_to_hf(mcore, tmp_path / "hf", progress=False)


def test_layouts_megatron_cannot_run_are_refused(hf_models, tmp_path):
    with pytest.raises(ConversionError, match="--tp 3 must divide num_attention_heads=4"):
        convert_hf_to_mcore(hf_models["llama_mqa"], tmp_path / "a", tp=3, progress=False)
    three_groups = tmp_path / "three-groups"  # 6 query heads, 3 key/value heads
    three_groups.mkdir()
    config = json.loads((hf_models["llama_mqa"] / "config.json").read_text())
    (three_groups / "config.json").write_text(json.dumps(
        {**config, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16}))
    with pytest.raises(ConversionError, match="3 key/value heads cannot be shared out over 2"):
        convert_hf_to_mcore(three_groups, tmp_path / "c", tp=2, progress=False)
    with pytest.raises(ConversionError, match="does not cover"):
        convert_hf_to_mcore(hf_models["qwen2"], tmp_path / "b", pp=2, ckpt_format="legacy",
                            decoder_first_pipeline_num_layers=5, progress=False)
    with pytest.raises(FileExistsError):
        convert_hf_to_mcore(hf_models["qwen2"], hf_models["qwen3"], progress=False)


def test_cli(hf_models, tmp_path, capsys):
    out = tmp_path / "m"
    assert convert_cli(["hf-to-mcore", "--hf-dir", str(hf_models["mistral"]), "--out", str(out),
                        "--tp", "2", "--pp", "2", "--format", "legacy", "--dtype", "bf16",
                        "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "release").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert convert_cli(["mcore-to-hf", "--mcore-dir", str(out), "--out", str(tmp_path / "h"),
                        "--hf-template", str(hf_models["mistral"]), "--dtype", "fp32",
                        "--no-progress"]) == 0
    expected = {k: v.to(torch.bfloat16).float()
                for k, v in read_safetensors(hf_models["mistral"]).items()}
    assert_identical(expected, read_safetensors(tmp_path / "h"))
    bad = tmp_path / "bad"
    shutil.copytree(hf_models["mistral"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    assert convert_cli(["hf-to-mcore", "--hf-dir", str(bad), "--out", str(tmp_path / "x")]) == 1
    assert "hidden_act" in capsys.readouterr().err


def test_pai_style_wrapper_scripts(hf_models, tmp_path):
    import os
    import subprocess
    import sys

    from tests.launch import REPO

    script = REPO / "toolkits" / "model_checkpoints_convertor" / "qwen3" / "hf2mcore.sh"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}

    def run(*args):
        return subprocess.run(["bash", str(script), *map(str, args), "--no-progress"], env=env,
                              capture_output=True, text=True)

    mcore, back = tmp_path / "mcore", tmp_path / "hf"
    assert run(hf_models["qwen3"], mcore, 2, 1, "fp32", "hf2mcore").returncode == 0
    assert run(mcore, back, 1, 1, "fp32", "mcore2hf", hf_models["qwen3"]).returncode == 0
    assert_identical(read_safetensors(hf_models["qwen3"]), read_safetensors(back))
    wrong = run(hf_models["mistral"], tmp_path / "x", 1, 1, "fp32", "hf2mcore")
    assert wrong.returncode != 0 and "mistral model" in wrong.stderr
