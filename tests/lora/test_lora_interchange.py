"""LoRA adapters interchange with Hugging Face PEFT: import, export, logits at TP/PP 1-2.

Three families (fused q/k/v with bias, a partial adapter on q/v and gate only, a MoE's
attention and routed experts through PEFT's target_parameters) with random non-zero
adapters; our base + adapter logits equal HF + PEFT's within 1e-5 in fp32 at TP1, TP2 and PP2
(one torchrun launch of 2 gloo ranks).
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch.conversion.engine import ConversionError
from megatron_patch.conversion.lora_peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_lora
from megatron_patch.conversion.verify.lora import peft_logits
from tests.launch import REPO, run_module
from tests.lora.conftest import ADAPTED_PARAMETERS

TOLERANCE = 1e-5
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
TRAIN_STEPS = 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``megatron-patch ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "megatron_patch.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_export_gives_back_the_imported_peft_adapter(lora_models, tmp_path):
    for case, paths in lora_models.items():
        out = export_lora(paths["lora"], tmp_path / case, paths["hf"])
        original, exported = (load_file(str(d / ADAPTER_WEIGHTS))
                              for d in (paths["adapter"], out))
        assert set(original) <= set(exported), case
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), (case, key)
        # projections the PEFT adapter left out of a fused linear come back as zero updates
        assert all(not exported[k].any() for k in set(exported) - set(original)), case
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8)
        given = json.loads((paths["adapter"] / ADAPTER_CONFIG).read_text())["target_parameters"]
        assert config["target_parameters"] == (sorted(given) if given else None), case


def test_adapters_change_the_logits(lora_models):
    """The random adapters matter: HF + PEFT differs from the HF base (else parity is void)."""
    from megatron_patch.conversion.verify.logits import hf_logits

    paths = lora_models["mistral"]
    tokens = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    base = hf_logits(paths["hf"], tokens)
    adapted = peft_logits(paths["hf"], tokens, adapter_dir=paths["adapter"])
    assert (base - adapted).abs().max() > 1e-2


@pytest.fixture(scope="module")
def compared(lora_models, tmp_path_factory) -> dict:
    """Every case of one torchrun launch: logits per family and layout, and LoRA training."""
    tmp = tmp_path_factory.mktemp("compare")
    # routed experts' adapters need expert tensor parallelism 1
    cases = [{"id": f"{case}-tp{tp}-pp{pp}", "hf": str(paths["hf"]),
              "adapter": str(paths["adapter"]), "lora": str(paths["lora"]), "tp": tp, "pp": pp,
              "etp": 1 if case in ADAPTED_PARAMETERS else None}
             for case, paths in lora_models.items() for tp, pp in LAYOUTS]
    moe = {"hf": str(lora_models["qwen3_moe"]["hf"]), "tp": 2, "pp": 1, "etp": 2,
           "adapter": str(lora_models["qwen3_moe"]["adapter"]),
           "lora": str(lora_models["qwen3_moe"]["lora"])}
    cases.append({"id": "qwen3_moe-tp2-etp2", **moe})  # experts split over expert-TP ranks
    paths = lora_models["qwen2"]
    cases.append({"id": "train-qwen2-tp2", "hf": str(paths["hf"]), "adapter": str(paths["adapter"]),
                  "lora": str(paths["lora"]), "tp": 2, "pp": 1, "train": TRAIN_STEPS})
    cases.append({"id": "train-qwen3_moe-tp2-etp2", **moe, "sp": True, "train": TRAIN_STEPS})
    (tmp / "cases.json").write_text(json.dumps(cases))
    result = run_module("tests.lora.lora_worker", [str(tmp / "cases.json"),
                                                   str(tmp / "out.json")], nproc=2)
    print(result.stdout[-2000:])
    results = json.loads((tmp / "out.json").read_text())
    assert sorted(results) == sorted(case["id"] for case in cases)
    return results


@pytest.mark.distributed
def test_logits_match_hf_peft_at_tp_and_pp(compared):
    logits = {case: diff for case, diff in compared.items() if not case.startswith("train")}
    print("\n".join(f"  {case:24s} {diff:.3e}" for case, diff in logits.items()))
    assert len(logits) == 10 and all(diff <= TOLERANCE for diff in logits.values()), logits


@pytest.mark.distributed
def test_lora_training_matches_hf_peft(compared):
    """N AdamW steps of the adapters at TP2 (a MoE's experts split over 2 expert-TP ranks): loss
    and gradient norm per step equal HF + PEFT's (``verify --train-steps``'s comparison, fp32
    tolerance)."""
    for case in ("train-qwen2-tp2", "train-qwen3_moe-tp2-etp2"):  # MoE: experts' adapters
        loss_rel, grad_norm_rel = compared[case]
        assert loss_rel <= 1e-4 and grad_norm_rel <= 1e-4, (case, compared[case])


def test_import_lora_cli(lora_models, tmp_path):
    paths = lora_models["qwen2"]
    done = _cli("import-lora", "--adapter-dir", str(paths["adapter"]), "--mcore-dir",
                str(paths["mcore"]), "--out", str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_import_and_export_refusals(lora_models, tmp_path, capsys):
    from megatron_patch.lora import cli_export, cli_import

    paths = lora_models["qwen2"]
    assert cli_import.main(["--adapter-dir", str(tmp_path / "nowhere"), "--mcore-dir",
                            str(paths["mcore"]), "--out", str(tmp_path / "ckpt")]) == 1
    assert "adapter_config.json: missing" in capsys.readouterr().err
    assert cli_export.main(["--load", str(paths["mcore"]), "--out", str(tmp_path / "x")]) == 1
    assert "not a LoRA checkpoint" in capsys.readouterr().err


def test_rslora_adapters_are_refused(lora_models, tmp_path):
    from megatron_patch.conversion.lora_peft import import_lora

    paths = lora_models["qwen2"]
    adapter = tmp_path / "rslora"
    adapter.mkdir()
    config = json.loads((paths["adapter"] / ADAPTER_CONFIG).read_text()) | {"use_rslora": True}
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    (adapter / ADAPTER_WEIGHTS).write_bytes((paths["adapter"] / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ConversionError, match="use_rslora=True is not supported"):
        import_lora(adapter, paths["mcore"], tmp_path / "out")


@pytest.mark.parametrize("case", ["mistral", "qwen3_moe"])
def test_merged_model_equals_hf_peft(lora_models, tmp_path, case):
    """``export-lora --merge``: the base converted back to HF with B A added = HF + PEFT (a
    partial q/v + gate adapter; a MoE's attention and routed experts, merged per expert)."""
    from megatron_patch.conversion.lora_merge import merge_lora
    from megatron_patch.conversion.verify.logits import hf_logits

    paths = lora_models[case]
    merged = merge_lora(paths["lora"], tmp_path / "merged", paths["hf"])
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = peft_logits(paths["hf"], tokens, adapter_dir=paths["adapter"])
    assert (hf_logits(merged, tokens) - expected).abs().max() <= TOLERANCE


def test_peft_adapter_merged_in_memory_equals_hf_peft(lora_models):
    """``merge_into_hf_model`` (verify's reference without peft) of an adapter on attention and
    routed experts (transformers 5's 3D expert parameters) gives PEFT's logits."""
    from transformers import AutoModelForCausalLM

    from megatron_patch.conversion.lora_merge import adapter_deltas, merge_into_hf_model

    paths = lora_models["qwen3_moe"]
    deltas = adapter_deltas(paths["adapter"])  # [E, out, in], as the 3D parameters
    assert deltas["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 2 * 16, 64)
    assert deltas["model.layers.0.mlp.experts.down_proj"].shape == (8, 64, 16)
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(3))
    model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32)
    merge_into_hf_model(model, paths["adapter"])
    with torch.no_grad():
        merged = model(input_ids=tokens).logits
    expected = peft_logits(paths["hf"], tokens, adapter_dir=paths["adapter"])
    assert (merged - expected).abs().max() <= TOLERANCE


def test_in_memory_merge_of_an_adapter_on_some_layers(lora_models, tmp_path):
    """An adapter whose routed experts are adapted in some layers only (PEFT's
    ``layers_to_transform``) merges those layers only; experts tensors for parameters that
    ``target_parameters`` does not list are refused, naming the file."""
    from safetensors.torch import load_file, save_file

    from megatron_patch.conversion.engine import ConversionError
    from megatron_patch.conversion.lora_merge import adapter_deltas

    source = lora_models["qwen3_moe"]["adapter"]
    tensors = load_file(str(source / "adapter_model.safetensors"))
    some_layers = tmp_path / "some_layers"
    some_layers.mkdir()
    shutil.copy2(source / "adapter_config.json", some_layers)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.experts" not in k},
              str(some_layers / "adapter_model.safetensors"))
    deltas = adapter_deltas(some_layers)
    assert "model.layers.0.mlp.experts.down_proj" in deltas
    assert not any("layers.1.mlp.experts" in name for name in deltas)
    # the tensors adapt gate_up_proj too, the config lists down_proj alone
    save_file(tensors, str(some_layers / "adapter_model.safetensors"))
    config = json.loads((source / "adapter_config.json").read_text())
    config["target_parameters"] = [p for p in config["target_parameters"]
                                   if p.endswith("down_proj")]
    (some_layers / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="adapter_model.safetensors: .*target_parameters"):
        adapter_deltas(some_layers)


def test_eval_ppl_of_a_lora_checkpoint_equals_hf_peft(lora_models, tmp_path):
    """``megatron-patch eval-ppl`` of an adapters-only checkpoint (attention and routed
    experts' adapters on its base) gives HF + PEFT's perplexity on the same windows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_patch.generation.perplexity import windows
    from tests.conversion.tiny_models import save_tokenizer

    paths = lora_models["qwen3_moe"]
    save_tokenizer(tmp_path / "tokenizer", 240)  # word-level: "t57" is token 57
    generator = torch.Generator().manual_seed(2)  # (ids whose word starts with t0/t1/t2 split)
    documents = [torch.randint(30, 100, (n,), generator=generator).tolist() for n in (40, 9)]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in d)}) + "\n"
                            for d in documents))
    done = _cli("eval-ppl", "--load", str(paths["lora"]), "--data-path", str(data),
                "--seq-length", "16", "--dtype", "fp32", "--tokenizer-type", "HFTokenizer",
                "--tokenizer-path", str(tmp_path / "tokenizer"),
                "--output", str(tmp_path / "ppl.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ppl.json").read_text())
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32),
        str(paths["adapter"]))
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows(documents, 16):
            logits = model(input_ids=torch.tensor([window[:-1]])).logits[0].double()
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]),
                                                       reduction="sum").item()
            count += len(window) - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
