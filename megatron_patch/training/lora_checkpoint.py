"""Adapters-only checkpoints: the frozen base is read from its own checkpoint, the adapters
(with their optimizer state, schedule and RNG) are saved and resumed on their own.

A LoRA model's chunks save and load only their adapter tensors (:func:`save_adapters_only`);
the base weights come from ``--pretrained-checkpoint`` (Megatron's flag), or from ``--load``
when that holds a checkpoint without adapters (a converted or fully trained model: the first
LoRA run), and are read with the adapters left out (:func:`load_base_weights`). An adapter
checkpoint records the base it was trained on (its saved ``pretrained_checkpoint``) and its
``--lora-*`` settings, so resuming needs ``--load`` only (the settings become the defaults:
:func:`megatron_patch.arguments.model_defaults_from_argv`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from megatron.core.utils import unwrap_model

from megatron_patch.models.common.lora import LoraError, is_adapter_name
from megatron_patch.utils.metadata import saved_args

KeyFilter = Callable[[str], bool]


def _restricted(chunks: list[torch.nn.Module], keep: KeyFilter) -> list[tuple]:
    """Make ``chunks`` save/load only the state-dict keys ``keep`` accepts; the others are
    loaded as their current values. Returns what to restore (module, attribute, previous)."""
    changed = []
    for inner in unwrap_model(chunks):
        original = inner.sharded_state_dict

        def sharded_state_dict(*args, _original=original, **kwargs):
            return {key: value for key, value in _original(*args, **kwargs).items()
                    if keep(key)}

        changed.append((inner, "sharded_state_dict", sharded_state_dict))
    for chunk in chunks:
        original = chunk.load_state_dict

        def load_state_dict(state_dict, *args, _chunk=chunk, _original=original, **kwargs):
            current = _chunk.state_dict(keep_vars=True)
            return _original({**current, **state_dict}, *args, **kwargs)

        changed.append((chunk, "load_state_dict", load_state_dict))
    previous = [(module, name, module.__dict__.get(name)) for module, name, _ in changed]
    for module, name, replacement in changed:
        setattr(module, name, replacement)
    return previous


def _restore(previous: list[tuple]) -> None:
    for module, name, value in reversed(previous):
        if value is None:
            delattr(module, name)
        else:
            setattr(module, name, value)


def save_adapters_only(chunks: list[torch.nn.Module]) -> None:
    """From now on ``chunks`` save and load their adapter tensors only."""
    _restricted(chunks, is_adapter_name)


@contextlib.contextmanager
def base_weights_only(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """While active, ``chunks`` load their base weights only (adapters keep their values)."""
    previous = _restricted(chunks, lambda key: not is_adapter_name(key))
    try:
        yield
    finally:
        _restore(previous)


def is_adapter_checkpoint(load_dir: str | Path | None) -> bool:
    """Whether ``load_dir``'s latest checkpoint is an adapters-only LoRA checkpoint."""
    saved = saved_args(load_dir) if load_dir else None
    return bool(getattr(saved, "lora_rank", None))


def base_checkpoint_dir(args: argparse.Namespace) -> str:
    """Where the frozen base weights of a LoRA run come from (see the module docstring)."""
    if args.pretrained_checkpoint:
        return args.pretrained_checkpoint
    if args.load and saved_args(args.load) is not None:
        if not is_adapter_checkpoint(args.load):
            return args.load
        base = getattr(saved_args(args.load), "pretrained_checkpoint", None)
        if base:
            return base
    raise LoraError("LoRA needs the base model: pass --pretrained-checkpoint DIR (a converted "
                    "or trained Megatron checkpoint), or --load DIR of one")


def load_base_weights(model: list[torch.nn.Module], base_dir: str) -> None:
    """Read the base weights of ``model`` from ``base_dir`` (weights only, adapters kept)."""
    from megatron.training.global_vars import get_args

    from megatron_patch.training.checkpoint import load_megatron_checkpoint

    args = get_args()
    flags = ("pretrained_checkpoint", "finetune", "no_load_optim", "no_load_rng")
    saved = {name: getattr(args, name) for name in flags}
    args.pretrained_checkpoint, args.finetune = base_dir, True
    args.no_load_optim = args.no_load_rng = True
    try:
        with base_weights_only(model):
            load_megatron_checkpoint(model, None, None, load_arg="pretrained_checkpoint")
    finally:
        for name, value in saved.items():
            setattr(args, name, value)
    args.pretrained_checkpoint = base_dir  # saved with the adapters: resuming finds the base


def use_base_checkpoint(model: list[torch.nn.Module], args: argparse.Namespace) -> str:
    """Read the frozen base weights of a LoRA model (:func:`base_checkpoint_dir`), then make
    its checkpoints adapters-only; returns the base checkpoint directory."""
    base = base_checkpoint_dir(args)
    load_base_weights(model, base)
    save_adapters_only(model)
    return base
