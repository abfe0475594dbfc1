"""The model a launch trains: MODEL_SIZE if given, else the ``--load`` checkpoint's, else tiny.

A converted checkpoint (``megatron_patch.json``) or one saved by training (its saved args) gives
the architecture, the tokenizer and the vocabulary padding
(:mod:`megatron_patch.conversion.checkpoint_defaults`). An explicit MODEL_SIZE wins, but must be
the checkpoint's model: a different one is refused here, before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_patch.launch.flags import megatron_flags
from megatron_patch.launch.model_sizes import model_size_config
from megatron_patch.launch.settings import NO_CHECKPOINT, LaunchError, RunSettings
from megatron_patch.mapping.config import HFConfig
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.registry import family_for_hf_config, get_family

DEFAULT_SIZE = "tiny"
# Checkpoint defaults that are not architecture flags of the model itself.
_NOT_MODEL = ("model_family", "make_vocab_size_divisible_by", "patch_tokenizer_type",
              "patch_tokenizer_path")
# Architecture values compared between MODEL_SIZE and the checkpoint.
_COMPARED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "kv_channels", "num_experts", "moe_ffn_hidden_size",
             "multi_latent_attention")


@dataclass(frozen=True)
class RunModel:
    """The model's name (for the run name), Megatron values and flags, and its tokenizer."""

    size: str
    model: dict[str, Any]
    flags: list[str]
    tokenizer: tuple[str, str | None] | None = None  # (type, path) the checkpoint was made with


def _hf_config(family: str, model_size: str) -> HFConfig:
    """A size of the family's table, or the config.json of an HF model directory."""
    if not Path(model_size).is_dir():
        return model_size_config(family, model_size)
    config = load_hf_config(model_size)
    found = family_for_hf_config(config).name
    if found != family:
        raise LaunchError(f"MODEL_SIZE={model_size} is a {found} model, not {family}")
    return config


def _architecture_flags(model_size: str, model: dict) -> list[str]:
    """The model's Megatron flags; an HF directory is passed whole (``--hf-config-path``)."""
    if Path(model_size).is_dir():
        return ["--hf-config-path", str(Path(model_size).resolve())]
    try:
        return megatron_flags(model)
    except ValueError as exc:
        raise LaunchError(f"MODEL_SIZE={model_size}: {exc}; give MODEL_SIZE as the model's HF "
                          "directory instead") from None


def _checkpoint_defaults(family: str, checkpoint: str) -> dict[str, Any] | None:
    """The checkpoint's model defaults (None: no checkpoint there yet), of this family."""
    from megatron_patch.conversion.checkpoint_defaults import checkpoint_model_defaults

    try:
        defaults = checkpoint_model_defaults(checkpoint)
    except (ValueError, OSError) as exc:
        raise LaunchError(f"--load {checkpoint}: {exc}") from None
    found = (defaults or {}).get("model_family", family)
    if found != family:
        raise LaunchError(f"--load {checkpoint} holds a {found} model; train it with "
                          f"examples/{found}/run_mcore_{found}.sh")
    return defaults


def _check_same(size: str, model: dict, checkpoint: str, defaults: dict) -> None:
    differ = [f"{key}={model[key]} (checkpoint: {defaults[key]})" for key in _COMPARED
              if key in model and key in defaults and model[key] != defaults[key]]
    if differ:
        raise LaunchError(f"MODEL_SIZE={size} is not the model in --load {checkpoint}: "
                          f"{', '.join(differ)}; leave out --model-size to train the "
                          "checkpoint's model")


def run_model(family: str, settings: RunSettings) -> RunModel:
    """The model of ``settings``: MODEL_SIZE, else the ``--load`` checkpoint's, else tiny."""
    checkpoint = settings.pretrain_checkpoint_path
    defaults = None
    if checkpoint != NO_CHECKPOINT:
        if settings.model_size is None and not Path(checkpoint).is_dir():
            raise LaunchError(f"--load {checkpoint}: no such checkpoint directory (it gives "
                              "the model when --model-size is not given)")
        if Path(checkpoint).is_dir():
            defaults = _checkpoint_defaults(family, checkpoint)
    tokenizer = None
    if defaults and defaults.get("patch_tokenizer_type"):
        tokenizer = (defaults["patch_tokenizer_type"], defaults.get("patch_tokenizer_path"))
    if settings.model_size is None and defaults:
        model = {key: value for key, value in defaults.items() if key not in _NOT_MODEL}
        try:
            flags = megatron_flags(model)
        except ValueError as exc:
            raise LaunchError(f"--load {checkpoint}: {exc}; give --model-size as the model's HF "
                              "directory") from None
        flags += ["--make-vocab-size-divisible-by", str(defaults["make_vocab_size_divisible_by"])]
        return RunModel(Path(checkpoint).resolve().name, model, flags, tokenizer)
    size = settings.model_size or DEFAULT_SIZE
    model = get_family(family).hf_to_megatron(_hf_config(family, size))
    if defaults:
        _check_same(size, model, checkpoint, defaults)
    return RunModel(size, model, _architecture_flags(size, model), tokenizer)
