"""LoRA adapters merged into Hugging Face weights: ``W + alpha / r * B A`` per adapted linear."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from megatron_patch.conversion.engine import ConversionError
from megatron_patch.conversion.hf_io import HFCheckpoint, ShardedSafetensorsWriter, parse_size
from megatron_patch.conversion.lora_peft import (
    ADAPTER_WEIGHTS,
    EXPERT_PARAMETERS,
    PEFT_PREFIX,
    adapter_checkpoint,
    expert_peft_key,
    opened_adapters,
    peft_expert_modules,
    peft_expert_targets,
    read_peft_adapter,
    split_expert_lora,
)
from megatron_patch.models.common.lora import A_NAME, B_NAME, low_rank_update
from megatron_patch.utils.files import atomic_directory


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """In-memory HF parameter name -> the update ``alpha / r * B A`` (fp32) of a PEFT adapter:
    ``X.weight`` of each adapted linear; a routed experts' 3D parameter (``target_parameters``,
    ``...mlp.experts.gate_up_proj``) gets the stack of its experts' updates ``[E, out, in]``."""
    settings, tensors = read_peft_adapter(adapter_dir)
    targets = peft_expert_targets(adapter_dir)
    deltas = {}
    for module in peft_expert_modules(adapter_dir, tensors):
        for target in targets:
            keys = [expert_peft_key(module, target, targets, m) for m in ("lora_A", "lora_B")]
            if not all(key in tensors for key in keys):
                continue  # not adapted in this layer (e.g. layers_to_transform): no update
            a, b = split_expert_lora(*(tensors.pop(key) for key in keys), settings.rank)
            deltas[f"{module}.{EXPERT_PARAMETERS[target]}"] = low_rank_update(a, b, None,
                                                                              settings)
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_A.", 1)[0]
        if b is None or module.endswith(".base_layer"):
            raise ConversionError(
                f"{Path(adapter_dir) / ADAPTER_WEIGHTS}: {key} has no lora_B, or adapts other "
                "experts parameters in its layer than target_parameters lists (PEFT adapts the "
                "same ones in every layer it adapts)")
        deltas[f"{module}.weight"] = low_rank_update(a, b, None, settings)
    return deltas


@torch.no_grad()
def merge_into_hf_model(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Add a PEFT adapter's updates to an HF model's weights in place."""
    for name, delta in adapter_deltas(adapter_dir).items():
        weight = model.get_parameter(name)
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if delta.dim() == 3 and getattr(owner, "is_transposed", False):  # [E, in, out] experts
            delta = delta.transpose(1, 2)
        if weight.shape != delta.shape:
            raise ValueError(f"{adapter_dir}: the update of {name} has shape "
                             f"{tuple(delta.shape)}, the model's parameter {tuple(weight.shape)} "
                             "(the adapter belongs to another base model)")
        weight.add_(delta.to(weight.dtype))


def checkpoint_deltas(load: str | Path, scratch: Path) -> dict[str, torch.Tensor]:
    """HF checkpoint tensor name -> the update ``alpha / r * B A`` (fp32) of every adapted
    linear of the LoRA checkpoint ``load``, routed experts' per-expert tensors included
    (``scratch``: a directory for the one-process group's store)."""
    deltas: dict[str, torch.Tensor] = {}
    with opened_adapters(adapter_checkpoint(load), scratch) as (adapters, read):
        for linears in [[linear] for linear in adapters.linears] + list(adapters.experts.values()):
            loaded = read(linears)
            for linear in linears:
                deltas.update(adapters.hf_delta(linear, loaded[f"{linear}.{A_NAME}"],
                                                loaded[f"{linear}.{B_NAME}"]))
    return deltas


def merge_hf_directory(hf_dir: str | Path, deltas: dict[str, torch.Tensor], out: str | Path,
                       max_shard_size: str = "5GB") -> Path:
    """Write ``hf_dir``'s model with ``deltas`` (HF checkpoint tensor name -> update) added into
    ``out`` (other files copied)."""
    reader = HFCheckpoint(hf_dir)
    missing = sorted(set(deltas) - set(reader.names))
    if missing:
        raise ValueError(f"{hf_dir}: the adapter adapts {missing[0]} (and {len(missing) - 1} "
                         "more), which the model does not have")
    with atomic_directory(out) as scratch:
        writer = ShardedSafetensorsWriter(scratch, parse_size(max_shard_size))
        for name in reader.names:
            tensor = reader.get(name)
            if name in deltas:
                if deltas[name].shape != tensor.shape:
                    raise ValueError(f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, its "
                                     f"adapter update {tuple(deltas[name].shape)} (the adapter "
                                     "belongs to another base model)")
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
    model directory at ``out``: each adapted linear's update ``alpha / r * B A`` is computed in
    the Megatron layout and split into HF tensors by the family's weight mapping."""
    from megatron_patch.conversion.mcore_to_hf import convert_mcore_to_hf
    from megatron_patch.training.lora_checkpoint import saved_args

    base = getattr(saved_args(load), "pretrained_checkpoint", None)
    if not base:
        raise FileNotFoundError(f"{load}: not a LoRA checkpoint that records its base "
                                "(--pretrained-checkpoint); merge needs the base weights")
    with tempfile.TemporaryDirectory(dir=Path(out).resolve().parent) as work:
        deltas = checkpoint_deltas(load, Path(work))
        hf_base = convert_mcore_to_hf(base, Path(work) / "base", hf_template=hf_template,
                                      dtype=dtype, progress=False)
        return merge_hf_directory(hf_base, deltas, out)
