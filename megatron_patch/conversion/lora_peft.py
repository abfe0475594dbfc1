"""Adapters-only Megatron checkpoints <-> Hugging Face PEFT adapter directories.

A PEFT LoRA adapter is ``adapter_config.json`` plus ``adapter_model.safetensors`` holding, per
adapted HF linear ``X`` (``X.weight`` in the model), ``base_model.model.X.lora_A.weight``
``[r, in]`` and ``...lora_B.weight`` ``[out, r]``. The Megatron side is the adapters of the
TP=1, PP=1 layout model (:mod:`megatron_patch.conversion.layout`) with :func:`apply_lora`: the
family's weight-mapping rule of the base linear turns B (stored in the base weight's fused row
layout) into the HF projections' B, and the stacked A into one A per projection. A fused
projection that the PEFT adapter leaves out (``target_modules`` q_proj, v_proj only) is imported
with zero A and B: its update is zero, as in PEFT, and stays zero in training.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from megatron_patch.conversion.engine import ConversionError, rule_for
from megatron_patch.conversion.layout import (
    build_layout,
    expert_index,
    family_of,
    single_process_group,
    single_stage_args,
)
from megatron_patch.conversion.mcore_to_hf import checkpoint_directory
from megatron_patch.conversion.torch_dist import TorchDistCheckpoint, save_torch_dist
from megatron_patch.models.common.lora import (
    A_NAME,
    B_NAME,
    LoraSettings,
    apply_lora,
    is_adapter_name,
    parts_of_rows,
    settings_from_args,
)
from megatron_patch.utils.files import atomic_directory
from megatron_patch.utils.metadata import METADATA_FILE, TRACKER_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _peft_key(hf_weight: str, matrix: str) -> str:
    """PEFT's tensor name of ``lora_A``/``lora_B`` for the HF linear of ``hf_weight``."""
    return f"{PEFT_PREFIX}{hf_weight.removesuffix('.weight')}.{matrix}.weight"


class AdapterLayout:
    """The TP=1 layout model of a checkpoint's architecture with adapters, and its rules."""

    def __init__(self, args, settings: LoraSettings):
        self.family = family_of(args)
        self.layout = build_layout(single_stage_args(args, self.family), self.family,
                                   torch.float32)
        config = self.layout.config
        self.rules = self.family.weight_mappings(config, self.layout.tied)
        apply_lora(self.layout.model, settings, self.rules, config, seed=0)
        self.settings = settings
        adapted = sorted({name.removesuffix(f".{A_NAME}").removesuffix(f".{B_NAME}")
                          for name in self.layout.parameters if is_adapter_name(name)})
        self.linears = [name for name in adapted if expert_index(name) is None]
        # target names whose linears include routed experts: no PEFT counterpart here
        self.expert_targets = sorted({name.rsplit(".", 1)[-1] for name in adapted
                                      if expert_index(name) is not None})

    def refuse_experts(self, targets: list[str] | tuple[str, ...], source: object) -> None:
        """Raise when ``targets`` adapt routed experts (they have no PEFT form here)."""
        experts = sorted(set(targets) & set(self.expert_targets))
        if experts:
            raise ConversionError(
                f"{source}: {','.join(experts)} adapters include routed experts: transformers 5 "
                "stores experts as fused 3D parameters, which PEFT adapts through "
                "target_parameters; exchange adapters of attention (and of dense MLPs) only "
                "(--lora-target-modules linear_qkv,linear_proj)")

    def hf_tensors(self, linear: str, a: torch.Tensor, b: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
        """PEFT tensors of one adapted Megatron linear from its unsharded A and B."""
        rule, layer = rule_for(self.rules, f"{linear}.weight")
        config, rank = self.layout.config, self.settings.rank
        b_parts = rule.to_hf(b, layer, config)
        names = rule.hf_names(layer)
        a_parts = dict(zip(names, a.split(rank))) if len(b_parts) > 1 else {names[0]: a}
        tensors = {}
        for hf_name in names:
            tensors[_peft_key(hf_name, "lora_A")] = a_parts[hf_name].contiguous()
            tensors[_peft_key(hf_name, "lora_B")] = b_parts[hf_name].contiguous()
        return tensors

    def megatron_tensors(self, linear: str, peft: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
        """Unsharded A and B of one Megatron linear from PEFT tensors (absent parts: zeros)."""
        rule, layer = rule_for(self.rules, f"{linear}.weight")
        config = self.layout.config
        shapes = {name: tuple(self.layout.parameters[f"{linear}.{name}"].shape)
                  for name in (A_NAME, B_NAME)}
        names = rule.hf_names(layer)
        rows = shapes[B_NAME][0]
        parts = parts_of_rows(rule, layer, config, rows)
        a_blocks, b_parts = [], {}
        for index, hf_name in enumerate(names):
            in_features = shapes[A_NAME][1]
            out_rows = rows if parts is None else int((parts == index).sum())
            a = peft.get(_peft_key(hf_name, "lora_A"))
            b = peft.get(_peft_key(hf_name, "lora_B"))
            if a is None or b is None:
                a = torch.zeros(self.settings.rank, in_features)
                b = torch.zeros(out_rows, self.settings.rank)
            _check_shape(hf_name, "lora_A", a, (self.settings.rank, in_features))
            _check_shape(hf_name, "lora_B", b, (out_rows, self.settings.rank))
            a_blocks.append(a)
            b_parts[hf_name] = b
        fused_b = rule.to_megatron(b_parts, layer, config)[f"{linear}.weight"]
        return {f"{linear}.{A_NAME}": torch.cat(a_blocks), f"{linear}.{B_NAME}": fused_b}


def _check_shape(hf_name: str, matrix: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{_peft_key(hf_name, matrix)}: shape {tuple(tensor.shape)}, the "
                              f"model expects {tuple(shape)} (rank and base model must match)")


def _adapter_checkpoint(load: Path) -> TorchDistCheckpoint:
    checkpoint = TorchDistCheckpoint(checkpoint_directory(load))
    if checkpoint.args is None or settings_from_args(checkpoint.args) is None:
        raise ConversionError(f"{load}: not a LoRA checkpoint (its saved arguments have no "
                              "--lora-rank); train with --lora-rank R, or import a PEFT adapter "
                              "with megatron-patch import-lora")
    return checkpoint


def _alpha_value(alpha: float) -> int | float:
    return int(alpha) if float(alpha).is_integer() else alpha


def export_lora(load: str | Path, out: str | Path, hf_template: str | Path | None = None
                ) -> Path:
    """Write the adapters of the LoRA checkpoint ``load`` as a PEFT adapter directory."""
    from safetensors.torch import save_file

    load = Path(load)
    checkpoint = _adapter_checkpoint(load)
    settings = settings_from_args(checkpoint.args)
    with atomic_directory(out) as scratch, single_process_group(scratch):
        adapters = AdapterLayout(checkpoint.args, settings)
        adapters.refuse_experts(settings.targets, load)
        checkpoint.check(adapters.layout, keys=is_adapter_name)
        tensors: dict[str, torch.Tensor] = {}
        for linear in adapters.linears:
            names = [f"{linear}.{A_NAME}", f"{linear}.{B_NAME}"]
            loaded = checkpoint.load(names)
            tensors.update(adapters.hf_tensors(linear, *(loaded[n].float() for n in names)))
        save_file(tensors, str(scratch / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        modules = sorted({key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
                          for key in tensors})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank,
            "lora_alpha": _alpha_value(settings.alpha), "lora_dropout": settings.dropout,
            "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": str(hf_template) if hf_template else None,
        }
        (scratch / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
                "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}


def read_peft_adapter(adapter_dir: str | Path) -> tuple[LoraSettings, dict[str, torch.Tensor]]:
    """Settings and tensors of a PEFT LoRA adapter directory (plain LoRA only)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing; a PEFT adapter directory (save_pretrained "
                                    "of a PeftModel) has adapter_config.json and "
                                    "adapter_model.safetensors")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{config_file}: peft_type {config.get('peft_type')!r}; only LORA "
                              "adapters are imported")
    for field, plain in _UNSUPPORTED.items():
        value = config.get(field, plain)
        if value and value != plain:
            raise ConversionError(f"{config_file}: {field}={config[field]!r} is not supported "
                                  f"(plain LoRA needs {field}={plain!r})")
    settings = LoraSettings(int(config["r"]), float(config["lora_alpha"]),
                            float(config.get("lora_dropout") or 0.0))
    tensors = {key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.",
                                                                   ".lora_B."): value.float()
               for key, value in load_file(str(weights_file)).items()}
    return settings, tensors


def import_lora(adapter_dir: str | Path, mcore_dir: str | Path, out: str | Path) -> Path:
    """Write the PEFT adapter in ``adapter_dir`` as an adapters-only checkpoint of the base
    Megatron checkpoint ``mcore_dir`` (a release checkpoint: training resumes from it with
    ``--load OUT``, the base read from ``mcore_dir``)."""
    mcore_dir = Path(mcore_dir)
    settings, peft = read_peft_adapter(adapter_dir)
    base = TorchDistCheckpoint(checkpoint_directory(mcore_dir))
    if base.args is None:
        raise ConversionError(f"{mcore_dir}: the checkpoint holds no Megatron args")
    with atomic_directory(out) as scratch, single_process_group(scratch):
        adapters = AdapterLayout(base.args, settings)
        hf_names = {linear: rule_for(adapters.rules, f"{linear}.weight")[0].hf_names(
            rule_for(adapters.rules, f"{linear}.weight")[1]) for linear in adapters.linears}
        present = {linear for linear, names in hf_names.items()
                   if any(_peft_key(name, "lora_A") in peft for name in names)}
        unused = sorted(set(peft) - {_peft_key(name, matrix) for names in hf_names.values()
                                     for name in names for matrix in ("lora_A", "lora_B")})
        if unused or not present:
            raise ConversionError(f"{adapter_dir}: {len(unused)} adapter tensors have no "
                                  f"Megatron linear (e.g. {(unused or ['none'])[0]}); adapters "
                                  "on attention and dense MLP projections are imported")
        targets = sorted({linear.rsplit(".", 1)[-1] for linear in present})
        adapters.refuse_experts(targets, adapter_dir)
        source: dict[str, torch.Tensor] = {}
        for linear in adapters.linears:
            if linear.rsplit(".", 1)[-1] in targets:
                source.update(adapters.megatron_tensors(linear, peft))
        source_linears = {name.rsplit(".", 2)[0] for name in source}
        args = copy.copy(base.args)
        args.lora_rank, args.lora_alpha = settings.rank, settings.alpha
        args.lora_dropout = settings.dropout
        args.lora_target_modules = ",".join(targets)
        args.pretrained_checkpoint = str(mcore_dir.resolve())
        args.finetune = False
        release = scratch / "release"
        release.mkdir()
        common = {"args": args, "checkpoint_version": 3.0, "iteration": 0}
        save_torch_dist(adapters.layout, release, lambda name: source[name], common,
                        progress=False, keys=lambda key: is_adapter_name(key)
                        and key.rsplit(".", 2)[0] in source_linears)
        (scratch / TRACKER_FILE).write_text("release")
        if (mcore_dir / METADATA_FILE).is_file():  # the architecture, for --load defaults
            shutil.copy2(mcore_dir / METADATA_FILE, scratch / METADATA_FILE)
    return Path(out)
