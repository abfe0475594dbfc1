"""Launcher settings in Pai-Megatron-Patch's positional order, parsed and validated up front.

``run_pretrain_mcore_<family>.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN
PAD_LEN PR TP PP CP SP DO FL AC SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS
WARMUP_TOKENS OUTPUT_BASEPATH [extra Megatron flags...]`` (``run_finetune_mcore_<family>.sh`` the
same). Missing trailing positions take the tiny-demo defaults, so the scripts run with no
arguments at all. ``PAD_LEN`` is the fine-tuning sequence length (samples are padded or packed to
it; at most ``SEQ_LEN``); pretraining uses ``SEQ_LEN``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass


class LaunchError(ValueError):
    """A launcher setting is invalid; the message names it and what was expected."""


SHIPPED_DATA = "shipped"
NO_CHECKPOINT = "none"


@dataclass(frozen=True)
class RunSettings:
    """One launch, field names as in Pai-Megatron-Patch's scripts (lower-cased)."""

    env: str = "dsw"
    model_size: str = "tiny"
    batch_size: int = 8
    global_batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    seq_len: int = 128
    pad_len: int = 128
    pr: str = "auto"
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    do: bool = False
    fl: bool = True
    ac: str = "none"
    save_interval: int = 100
    dataset_path: str = SHIPPED_DATA
    pretrain_checkpoint_path: str = NO_CHECKPOINT
    train_tokens: int = 200 * 16 * 128
    warmup_tokens: int = 20 * 16 * 128
    output_basepath: str = "output"

    @property
    def tokens_per_iteration(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.global_batch_size * self.seq_len

    @property
    def train_iters(self) -> int:
        """Optimizer steps covering ``train_tokens`` (at least one)."""
        return max(1, self.train_tokens // self.tokens_per_iteration)

    @property
    def warmup_iters(self) -> int:
        """Warm-up steps covering ``warmup_tokens``."""
        return self.warmup_tokens // self.tokens_per_iteration


POSITIONAL = tuple(field.name.upper() for field in dataclasses.fields(RunSettings))
# Demo defaults that differ by mode: the fine-tuning demo converges in 100 iterations.
MODE_DEFAULTS = {"finetune": {"train_tokens": 100 * 16 * 128, "warmup_tokens": 10 * 16 * 128}}
_CHOICES = {"env": ("dsw", "dlc"), "pr": ("auto", "fp32", "fp16", "bf16", "fp8"),
            "ac": ("none", "false", "sel", "full")}


def _number(text: str) -> float:
    suffixes = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    scale = suffixes.get(text[-1:].upper(), 1)
    return float(text[:-1] if scale != 1 else text) * scale


def _convert(name: str, kind: type, text: str):
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if kind is int:
            value = _number(text)
            if value != int(value):
                raise ValueError
            return int(value)
        if kind is float:
            return _number(text)
        return text
    except ValueError:
        raise LaunchError(f"{name.upper()}={text!r}: expected {kind.__name__}") from None


def parse_positional(values: Sequence[str],
                     mode: str = "pretrain") -> tuple[RunSettings, list[str]]:
    """Settings from positional values (Pai order) and the Megatron flags that follow them."""
    values = list(values)
    count = next((i for i, v in enumerate(values) if v.startswith("--")), len(values))
    if count > len(POSITIONAL):
        raise LaunchError(f"at most {len(POSITIONAL)} positional arguments "
                          f"({' '.join(POSITIONAL)}), got {count}")
    types = {f.name: f.type for f in dataclasses.fields(RunSettings)}
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    given = {}
    for name, text in zip((n.lower() for n in POSITIONAL), values[:count]):
        value = _convert(name, kinds[types[name]], text)
        if name in _CHOICES and value not in _CHOICES[name]:
            raise LaunchError(f"{name.upper()}={value!r}: expected one of {_CHOICES[name]}")
        given[name] = value
    return RunSettings(**{**MODE_DEFAULTS.get(mode, {}), **given}), values[count:]
