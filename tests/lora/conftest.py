"""Tiny HF models, their converted bases and random PEFT adapters (non-zero B), once per run."""

from pathlib import Path

import pytest
import torch

from tests.conversion.tiny_models import save_tiny_model

# case -> PEFT target modules: all projections; q/v and gate only (partial fused q/k/v and
# gate/up: the missing parts import as zero updates); a MoE's attention and routed experts
# (transformers 5's 3D expert parameters, PEFT's target_parameters).
ADAPTED = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
ADAPTED_PARAMETERS = {"qwen3_moe": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
RANK, ALPHA = 4, 8


def save_random_adapter(hf_dir: Path, out: Path, targets: list[str], seed: int = 0,
                        parameters: list[str] | None = None) -> Path:
    """A PEFT LoRA adapter of ``hf_dir``'s model with random A and B (a non-zero update) on
    the ``targets`` modules and the ``parameters`` (3D expert weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                        target_parameters=parameters, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """case -> {"hf", "mcore" (converted base), "adapter" (PEFT), "lora" (imported)}."""
    from megatron_patch.conversion import convert_hf_to_mcore
    from megatron_patch.conversion.lora_peft import import_lora

    root = tmp_path_factory.mktemp("lora")
    models = {}
    for case, targets in ADAPTED.items():
        hf = save_tiny_model(case, root / case)
        mcore = convert_hf_to_mcore(hf, root / f"{case}-mcore", progress=False)
        adapter = save_random_adapter(hf, root / f"{case}-adapter", targets,
                                      parameters=ADAPTED_PARAMETERS.get(case))
        lora = import_lora(adapter, mcore, root / f"{case}-lora")
        models[case] = {"hf": hf, "mcore": mcore, "adapter": adapter, "lora": lora}
    return models
