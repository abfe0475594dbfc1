"""LoRA adapters merged into Hugging Face weights: ``W + alpha / r * B A`` per adapted linear."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from megatron_patch.conversion.hf_io import HFCheckpoint, ShardedSafetensorsWriter, parse_size
from megatron_patch.conversion.lora_peft import (
    PEFT_PREFIX,
    peft_expert_targets,
    read_peft_adapter,
)
from megatron_patch.utils.files import atomic_directory


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """HF weight name -> the adapter's update ``alpha / r * B A`` (fp32) of a PEFT adapter."""
    settings, tensors = read_peft_adapter(adapter_dir)
    if peft_expert_targets(adapter_dir):
        raise ValueError(f"{adapter_dir}: the adapter adapts routed experts (PEFT "
                         "target_parameters), which megatron-patch does not merge yet; merge "
                         "with PEFT: PeftModel.from_pretrained(model, DIR).merge_and_unload()")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_A.", 1)[0]
        deltas[f"{module}.weight"] = settings.scaling * (b.double() @ a.double()).float()
    return deltas


@torch.no_grad()
def merge_into_hf_model(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Add a PEFT adapter's updates to an HF model's weights in place."""
    for name, delta in adapter_deltas(adapter_dir).items():
        weight = model.get_parameter(name)
        weight.add_(delta.to(weight.dtype))


def merge_hf_directory(hf_dir: str | Path, adapter_dir: str | Path, out: str | Path,
                       max_shard_size: str = "5GB") -> Path:
    """Write ``hf_dir``'s model with the adapter merged into ``out`` (other files copied)."""
    deltas = adapter_deltas(adapter_dir)
    reader = HFCheckpoint(hf_dir)
    missing = sorted(set(deltas) - set(reader.names))
    if missing:
        raise ValueError(f"{hf_dir}: the adapter {adapter_dir} adapts {missing[0]} (and "
                         f"{len(missing) - 1} more), which the model does not have")
    with atomic_directory(out) as scratch:
        writer = ShardedSafetensorsWriter(scratch, parse_size(max_shard_size))
        for name in reader.names:
            tensor = reader.get(name)
            if name in deltas:
                tensor = (tensor.float() + deltas[name]).to(tensor.dtype)
            writer.add(name, tensor)
        writer.finish()
        for file in Path(hf_dir).iterdir():
            if file.is_file() and not file.name.endswith(".safetensors") \
                    and file.name != "model.safetensors.index.json":
                shutil.copy2(file, scratch / file.name)
    return Path(out)


def merge_lora(load: str | Path, out: str | Path, hf_template: str | Path | None = None,
               dtype: str | None = None) -> Path:
    """The LoRA checkpoint ``load`` with its base (the checkpoint it records) as one merged HF
    model directory at ``out``."""
    from megatron_patch.conversion.lora_peft import export_lora
    from megatron_patch.conversion.mcore_to_hf import convert_mcore_to_hf
    from megatron_patch.training.lora_checkpoint import saved_args

    base = getattr(saved_args(load), "pretrained_checkpoint", None)
    if not base:
        raise FileNotFoundError(f"{load}: not a LoRA checkpoint that records its base "
                                "(--pretrained-checkpoint); merge needs the base weights")
    with tempfile.TemporaryDirectory(dir=Path(out).resolve().parent) as work:
        adapter = export_lora(load, Path(work) / "adapter", hf_template)
        hf_base = convert_mcore_to_hf(base, Path(work) / "base", hf_template=hf_template,
                                      dtype=dtype, progress=False)
        return merge_hf_directory(hf_base, adapter, out)
