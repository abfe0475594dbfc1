"""Adapters-only Megatron checkpoints <-> Hugging Face PEFT adapter directories.

A PEFT LoRA adapter is ``adapter_config.json`` plus ``adapter_model.safetensors`` holding, per
adapted HF linear ``X`` (``X.weight`` in the model), ``base_model.model.X.lora_A.weight``
``[r, in]`` and ``...lora_B.weight`` ``[out, r]``. The Megatron side is the adapters of the
TP=1, PP=1 layout model (:mod:`megatron_patch.conversion.layout`) with :func:`apply_lora`: the
family's weight-mapping rule of the base linear turns B (stored in the base weight's fused row
layout) into the HF projections' B, and the stacked A into one A per projection. A fused
projection that the PEFT adapter leaves out (``target_modules`` q_proj, v_proj only) is imported
with zero A and B: its update is zero, as in PEFT, and stays zero in training.

Routed experts: transformers 5 keeps a MoE layer's experts as two 3D parameters of one module,
``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``, which PEFT
adapts through ``target_parameters``. Its adapter is one rank-r LoRA per expert with PEFT's
scale alpha / r: ``lora_A`` ``[E*r, in]`` holds expert e's A in rows ``e*r ... e*r+r``,
``lora_B`` ``[out, r*E]`` holds column j of expert e's B in column ``j*E + e``, and expert e's
weight gets ``alpha / r * B_e A_e``. That is exactly our adapter of each expert's linear (the
fused gate/up with one A, B in HF's ``[gate; up]`` rows). PEFT nests one wrapper per targeted
parameter of the module in the order the module registers them (gate/up first, innermost): the
inner one's tensors are named ``experts.base_layer.lora_A`` ...
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    low_rank_update,
    parts_of_rows,
    settings_from_args,
)
from megatron_patch.utils.files import atomic_directory
from megatron_patch.utils.metadata import METADATA_FILE, TRACKER_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

log = logging.getLogger(__name__)


# a Megatron expert linear -> transformers 5's 3D parameter of the experts module, in the order
# the module registers them (PEFT's nesting order)
EXPERT_PARAMETERS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}
_LAYER_PREFIX = re.compile(r"^.*?layers[.][0-9]+[.]")


def _peft_key(hf_weight: str, matrix: str) -> str:
    """PEFT's tensor name of ``lora_A``/``lora_B`` for the HF linear of ``hf_weight``."""
    return f"{PEFT_PREFIX}{hf_weight.removesuffix('.weight')}.{matrix}.weight"


def expert_peft_key(module: str, target: str, targets: set[str], matrix: str) -> str:
    """PEFT's tensor name of ``lora_A``/``lora_B`` of the experts parameter of ``target`` in
    the HF experts ``module`` when ``targets`` are adapted there (nested wrappers)."""
    order = [name for name in EXPERT_PARAMETERS if name in targets]
    nesting = "base_layer." * (len(order) - 1 - order.index(target))
    return f"{PEFT_PREFIX}{module}.{nesting}{matrix}.weight"


def _target_parameter(module: str, target: str) -> str:
    """``target_parameters`` entry of an experts parameter (``mlp.experts.gate_up_proj``)."""
    return f"{_LAYER_PREFIX.sub('', module)}.{EXPERT_PARAMETERS[target]}"


def split_expert_lora(a: torch.Tensor, b: torch.Tensor, rank: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert A ``[E, r, in]`` and B ``[E, out, r]`` of PEFT's ``lora_A`` ``[E*r, in]`` and
    ``lora_B`` ``[out, r*E]`` of one experts parameter (expert e's column j of B at ``j*E+e``)."""
    count = a.shape[0] // rank
    return (a.reshape(count, rank, a.shape[1]),
            b.reshape(b.shape[0], rank, count).permute(2, 0, 1))


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
        # (HF experts module, Megatron target) -> that layer's expert linears, by expert index
        self.experts: dict[tuple[str, str], list[str]] = {}
        for name in sorted((n for n in adapted if expert_index(n) is not None), key=expert_index):
            rule, layer = rule_for(self.rules, f"{name}.weight")
            module = rule.hf_names(layer)[0].rsplit(".", 3)[0]  # <module>.<e>.<proj>.weight
            self.experts.setdefault((module, name.rsplit(".", 1)[-1]), []).append(name)

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

    def hf_delta(self, linear: str, a: torch.Tensor, b: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        """HF tensor name -> the update ``alpha / r * B A`` (fp32) of one adapted Megatron
        linear (a routed expert's: its on-disk per-expert tensors) from its unsharded A and B."""
        rule, layer = rule_for(self.rules, f"{linear}.weight")
        config = self.layout.config
        # A holds one block per projection the adapter splits B's rows into (apply_lora)
        parts = (parts_of_rows(rule, layer, config, b.shape[0])
                 if a.shape[0] > self.settings.rank else None)
        update = low_rank_update(a, b, parts, self.settings)
        return {name: tensor.contiguous()
                for name, tensor in rule.to_hf(update, layer, config).items()}

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

    def _hf_rows(self, linear: str, b: torch.Tensor) -> torch.Tensor:
        """One expert's B (Megatron rows) in the HF 3D parameter's rows (``[gate; up]``)."""
        rule, layer = rule_for(self.rules, f"{linear}.weight")
        parts = rule.to_hf(b, layer, self.layout.config)
        return torch.cat([parts[name] for name in rule.hf_names(layer)])

    def hf_expert_tensors(self, module: str, target: str, targets: set[str],
                          loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT tensors of one experts parameter from its experts' unsharded A and B."""
        linears = self.experts[(module, target)]
        a = torch.cat([loaded[f"{linear}.{A_NAME}"] for linear in linears])
        b = torch.stack([self._hf_rows(linear, loaded[f"{linear}.{B_NAME}"])
                         for linear in linears], dim=-1)
        return {expert_peft_key(module, target, targets, "lora_A"): a.contiguous(),
                expert_peft_key(module, target, targets, "lora_B"):
                    b.reshape(b.shape[0], -1).contiguous()}

    def megatron_expert_tensors(self, module: str, target: str, targets: set[str],
                                peft: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unsharded A and B of one layer's expert linears from PEFT's tensors of one experts
        parameter (absent: zeros)."""
        linears, rank = self.experts[(module, target)], self.settings.rank
        shapes = {name: tuple(self.layout.parameters[f"{linears[0]}.{name}"].shape)
                  for name in (A_NAME, B_NAME)}
        count, (rows, in_features) = len(linears), (shapes[B_NAME][0], shapes[A_NAME][1])
        keys = [expert_peft_key(module, target, targets, m) for m in ("lora_A", "lora_B")]
        expected = {keys[0]: (count * rank, in_features), keys[1]: (rows, rank * count)}
        tensors = {key: peft.get(key, torch.zeros(shape)) for key, shape in expected.items()}
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ConversionError(f"{key}: shape {tuple(tensors[key].shape)}, the model "
                                      f"expects {shape} ({count} experts; rank and base model "
                                      "must match)")
        a, b = split_expert_lora(tensors[keys[0]], tensors[keys[1]], rank)
        config, result = self.layout.config, {}
        for expert, linear in enumerate(linears):
            rule, layer = rule_for(self.rules, f"{linear}.weight")
            parts = parts_of_rows(rule, layer, config, rows)
            sizes = [rows] if parts is None else torch.bincount(parts).tolist()
            hf = dict(zip(rule.hf_names(layer), b[expert].split(sizes)))
            result[f"{linear}.{A_NAME}"] = a[expert]
            result[f"{linear}.{B_NAME}"] = rule.to_megatron(hf, layer, config)[f"{linear}.weight"]
        return result


def _check_shape(hf_name: str, matrix: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{_peft_key(hf_name, matrix)}: shape {tuple(tensor.shape)}, the "
                              f"model expects {tuple(shape)} (rank and base model must match)")


def adapter_checkpoint(load: str | Path) -> TorchDistCheckpoint:
    """The adapters-only checkpoint ``load`` (its latest iteration); refused without LoRA."""
    checkpoint = TorchDistCheckpoint(checkpoint_directory(Path(load)))
    if checkpoint.args is None or settings_from_args(checkpoint.args) is None:
        raise ConversionError(f"{load}: not a LoRA checkpoint (its saved arguments have no "
                              "--lora-rank); train with --lora-rank R, or import a PEFT adapter "
                              "with megatron-patch import-lora")
    return checkpoint


def _alpha_value(alpha: float) -> int | float:
    return int(alpha) if float(alpha).is_integer() else alpha


AdapterReader = Callable[[list[str]], dict[str, torch.Tensor]]


@contextmanager
def opened_adapters(checkpoint: TorchDistCheckpoint, scratch: Path
                    ) -> Iterator[tuple[AdapterLayout, AdapterReader]]:
    """The adapter layout of a LoRA ``checkpoint`` (:func:`adapter_checkpoint`) and a reader of
    its linears' unsharded fp32 A and B (``{linear}.lora.A`` ...), in a one-process group whose
    store is in ``scratch``."""
    with single_process_group(scratch):
        adapters = AdapterLayout(checkpoint.args, settings_from_args(checkpoint.args))
        checkpoint.check(adapters.layout, keys=is_adapter_name)

        def read(linears: list[str]) -> dict[str, torch.Tensor]:
            loaded = checkpoint.load([f"{linear}.{matrix}" for linear in linears
                                      for matrix in (A_NAME, B_NAME)])
            return {name: tensor.float() for name, tensor in loaded.items()}

        yield adapters, read


def export_lora(load: str | Path, out: str | Path, hf_template: str | Path | None = None
                ) -> Path:
    """Write the adapters of the LoRA checkpoint ``load`` as a PEFT adapter directory."""
    from safetensors.torch import save_file

    checkpoint = adapter_checkpoint(load)
    with atomic_directory(out) as scratch, \
            opened_adapters(checkpoint, scratch) as (adapters, read):
        settings = adapters.settings
        tensors: dict[str, torch.Tensor] = {}
        for linear in adapters.linears:
            loaded = read([linear])
            tensors.update(adapters.hf_tensors(linear, loaded[f"{linear}.{A_NAME}"],
                                               loaded[f"{linear}.{B_NAME}"]))
        modules = sorted({key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
                          for key in tensors})
        expert_targets = {target for _, target in adapters.experts}
        for (module, target), linears in adapters.experts.items():
            tensors.update(adapters.hf_expert_tensors(module, target, expert_targets,
                                                      read(linears)))
        save_file(tensors, str(scratch / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        parameters = sorted({_target_parameter(module, target)
                             for module, target in adapters.experts})
        dropout = settings.dropout
        if parameters and dropout:
            log.warning("%s: PEFT's LoRA on expert parameters (target_parameters) has no "
                        "dropout; the adapter is written with lora_dropout 0 (the same model; "
                        "training it further in PEFT runs without dropout)", load)
            dropout = 0.0
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank,
            "lora_alpha": _alpha_value(settings.alpha), "lora_dropout": dropout,
            "target_modules": modules or None, "target_parameters": parameters or None,
            "bias": "none", "fan_in_fan_out": False,
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


def peft_expert_targets(adapter_dir: str | Path) -> set[str]:
    """Megatron targets of the experts parameters a PEFT adapter adapts (``target_parameters``:
    ``...experts.gate_up_proj`` -> linear_fc1, ``...experts.down_proj`` -> linear_fc2)."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    parameters = json.loads(config_file.read_text()).get("target_parameters") or []
    targets = {target: [p for p in parameters if p.rsplit(".", 1)[-1] == name]
               for target, name in EXPERT_PARAMETERS.items()}
    unknown = sorted(set(parameters) - {p for found in targets.values() for p in found})
    if unknown:
        raise ConversionError(f"{config_file}: target_parameters {unknown} are not routed "
                              "experts' gate_up_proj / down_proj (the 3D parameters imported)")
    return {target for target, found in targets.items() if found}


def peft_expert_modules(adapter_dir: str | Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """HF experts modules (``model.layers.0.mlp.experts``) whose 3D parameters the PEFT
    adapter's ``tensors`` (:func:`read_peft_adapter`) adapt through ``target_parameters``."""
    parameters = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get(
        "target_parameters") or []
    suffixes = {f".{parameter.rsplit('.', 1)[0]}" for parameter in parameters}
    modules = {re.sub(r"([.]base_layer)+$", "",
                      key.removeprefix(PEFT_PREFIX).rsplit(".lora_A.", 1)[0])
               for key in tensors if ".lora_A." in key}
    return sorted(module for module in modules if f".{module}".endswith(tuple(suffixes)))


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
        expert_targets = peft_expert_targets(adapter_dir)
        known = {_peft_key(name, matrix) for names in hf_names.values() for name in names
                 for matrix in ("lora_A", "lora_B")}
        known |= {expert_peft_key(module, target, expert_targets, matrix)
                  for module, target in adapters.experts if target in expert_targets
                  for matrix in ("lora_A", "lora_B")}
        unused = sorted(set(peft) - known)
        if unused or not (present or expert_targets):
            raise ConversionError(f"{adapter_dir}: {len(unused)} adapter tensors have no "
                                  f"Megatron linear (e.g. {(unused or ['none'])[0]}); adapters "
                                  "on attention, MLP projections and routed experts' "
                                  "gate_up_proj / down_proj are imported")
        targets = sorted({linear.rsplit(".", 1)[-1] for linear in present} | expert_targets)
        source: dict[str, torch.Tensor] = {}
        for linear in adapters.linears:
            if linear.rsplit(".", 1)[-1] in targets:
                source.update(adapters.megatron_tensors(linear, peft))
        for module, target in adapters.experts:
            if target in targets:  # experts the adapter leaves out: zero updates
                given = target in expert_targets
                source.update(adapters.megatron_expert_tensors(
                    module, target, expert_targets | {target}, peft if given else {}))
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
