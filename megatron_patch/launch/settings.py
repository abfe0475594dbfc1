"""Launcher settings: Pai-Megatron-Patch's positional orders or named flags, parsed up front.

``run_pretrain_mcore_<family>.sh`` / ``run_finetune_mcore_<family>.sh`` take Pai's original 22
positions (:data:`POSITIONAL`); ``run_mcore_<family>.sh`` takes the 25 of Pai's ``run_mcore_*.sh``
scripts (:data:`MCORE_POSITIONAL`; SFT chooses fine-tuning, whose last counts are iterations), or
27 with ``ETP EP`` for mixture-of-experts families (:data:`MCORE_MOE_POSITIONAL`). Missing
trailing positions take the tiny-demo defaults, so the scripts run with no arguments at all.

Named flags (``--model-size 8B --tp 2 ...``, :data:`NAMED_FLAGS`) may replace or follow the
positions and win over them; every other ``--flag`` is passed to Megatron unchanged. ``PAD_LEN``
is the fine-tuning sequence length (samples are padded or packed to it; at most ``SEQ_LEN``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class LaunchError(ValueError):
    """A launcher setting is invalid; the message names it and what was expected."""


SHIPPED_DATA = "shipped"
DEFAULT_WARMUP_ITERS = 20  # the default warm-up, shortened to a tenth of shorter runs
NO_CHECKPOINT = "none"
NO_PATH = "none"


@dataclass(frozen=True)
class RunSettings:
    """One launch, field names as in Pai-Megatron-Patch's scripts (lower-cased)."""

    env: str = "dsw"
    model_size: str | None = None  # None: the --load checkpoint's model, else tiny
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
    warmup_tokens: int | None = None  # None: DEFAULT_WARMUP_ITERS, at most a tenth of training
    output_basepath: str = "output"
    # Beyond the 22 original positions: run_mcore positions and named flags.
    vpp: int = 1  # virtual pipeline stages (model chunks) per pipeline rank
    ep: int = 1
    etp: int | None = None  # expert tensor parallelism; None: same as TP (Megatron's default)
    optimizer_offload: str = "false"  # false | true | static | fraction of the states on CPU
    valid_dataset_path: str = NO_PATH
    packing: bool | None = None  # fine-tuning; None: SFT_PACKING (default true)
    save_path: str | None = None  # default OUTPUT_BASEPATH/checkpoint/<run name>
    iterations: int | None = None  # explicit iteration counts replace the token counts
    warmup_iterations: int | None = None
    lora: int | None = None  # LoRA rank (alpha 2 * rank): adapters on the frozen --load model

    @property
    def tokens_per_iteration(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.global_batch_size * self.seq_len

    @property
    def train_iters(self) -> int:
        """Optimizer steps: explicit, or covering ``train_tokens`` (at least one)."""
        if self.iterations is not None:
            return self.iterations
        return max(1, self.train_tokens // self.tokens_per_iteration)

    @property
    def warmup_iters(self) -> int:
        """Warm-up steps: explicit, covering ``warmup_tokens``, or the default.

        The default is :data:`DEFAULT_WARMUP_ITERS`, at most a tenth of the training iterations.
        """
        if self.warmup_iterations is not None:
            return self.warmup_iterations
        if self.warmup_tokens is not None:
            return self.warmup_tokens // self.tokens_per_iteration
        return min(DEFAULT_WARMUP_ITERS, self.train_iters // 10)

    @property
    def warmup_shortened(self) -> bool:
        """Whether the default warm-up was shortened to fit a short run."""
        return (self.warmup_iterations is None and self.warmup_tokens is None
                and self.warmup_iters < DEFAULT_WARMUP_ITERS)

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size (TP unless set)."""
        return self.tp if self.etp is None else self.etp

    @property
    def offload_fraction(self) -> float:
        """Fraction of the optimizer states kept on the CPU (0: none)."""
        value = self.optimizer_offload.lower()
        if value == "false":
            return 0.0
        if value in ("true", "static"):
            return 1.0
        return float(value)


_BASE = ("ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN",
         "PAD_LEN", "PR", "TP", "PP", "CP")
_TAIL = ("SAVE_INTERVAL", "DATASET_PATH", "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH",
         "TRAIN_TOKENS_OR_ITERS", "WARMUP_TOKENS_OR_ITERS", "OUTPUT_BASEPATH")
# run_pretrain/run_finetune_mcore_<family>.sh
POSITIONAL = (*_BASE, "SP", "DO", "FL", "AC", "SAVE_INTERVAL", "DATASET_PATH",
              "PRETRAIN_CHECKPOINT_PATH", "TRAIN_TOKENS", "WARMUP_TOKENS", "OUTPUT_BASEPATH")
# run_mcore_<family>.sh, dense and mixture-of-experts families
MCORE_POSITIONAL = (*_BASE, "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD", *_TAIL)
MCORE_MOE_POSITIONAL = (*_BASE, "ETP", "EP", "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD",
                        *_TAIL)
LAYOUTS = {"pai": POSITIONAL, "mcore": MCORE_POSITIONAL, "mcore-moe": MCORE_MOE_POSITIONAL}
# Demo defaults that differ by mode: the fine-tuning demo converges in 100 iterations.
MODE_DEFAULTS = {"finetune": {"train_tokens": 100 * 16 * 128}}
MODES = {"pretrain": "pretrain", "finetune": "finetune", "sft": "finetune"}
_CHOICES = {"env": ("dsw", "dlc"), "pr": ("auto", "fp32", "fp16", "bf16", "fp8"),
            "ac": ("none", "false", "sel", "full")}


def _number(text: str) -> float:
    suffixes = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    scale = suffixes.get(text[-1:].upper(), 1)
    return float(text[:-1] if scale != 1 else text) * scale


def _as_int(text: str) -> int:
    value = _number(text)
    if value != int(value):
        raise ValueError
    return int(value)


def _as_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0"):
        raise ValueError
    return lowered in ("true", "1")


def _as_offload(text: str) -> str:
    if text.lower() in ("false", "true", "static"):
        return text.lower()
    if not 0.0 < float(text) <= 1.0:
        raise ValueError
    return text


def _as_mode(text: str) -> str:
    return MODES[text.lower()]


_PARSERS: dict[str, tuple[Callable[[str], object], str]] = {
    "batch_size": (_as_int, "an integer"), "global_batch_size": (_as_int, "an integer"),
    "lr": (_number, "a number"), "min_lr": (_number, "a number"),
    "seq_len": (_as_int, "an integer"), "pad_len": (_as_int, "an integer"),
    "tp": (_as_int, "an integer"), "pp": (_as_int, "an integer"), "cp": (_as_int, "an integer"),
    "vpp": (_as_int, "an integer"), "ep": (_as_int, "an integer"),
    "etp": (_as_int, "an integer"), "sp": (_as_bool, "true|false"),
    "do": (_as_bool, "true|false"), "fl": (_as_bool, "true|false"),
    "packing": (_as_bool, "true|false"), "save_interval": (_as_int, "an integer"),
    "train_tokens": (_as_int, "an integer (K/M/B/T suffixes allowed)"),
    "warmup_tokens": (_as_int, "an integer (K/M/B/T suffixes allowed)"),
    "iterations": (_as_int, "an integer"), "warmup_iterations": (_as_int, "an integer"),
    "lora": (_as_int, "an integer (the LoRA rank)"),
    "optimizer_offload": (_as_offload, "false|true|static|a fraction in (0, 1]"),
    "mode": (_as_mode, "pretrain|sft"), "sft": (_as_bool, "true|false"),
}


def _convert(name: str, text: str, label: str | None = None):
    """``text`` parsed as setting ``name``; errors name ``label`` (the position or flag)."""
    label = label or name.upper()
    parse, expected = _PARSERS.get(name, (str, "text"))
    try:
        value = parse(text)
    except (ValueError, KeyError):
        raise LaunchError(f"{label}={text!r}: expected {expected}") from None
    if name in _CHOICES and value not in _CHOICES[name]:
        raise LaunchError(f"{label}={value!r}: expected one of {_CHOICES[name]}")
    return value


# --flag -> setting; flags that Megatron also has (--lr, --load, ...) mean the same here.
NAMED_FLAGS = {
    "--env": "env", "--model-size": "model_size", "--mbs": "batch_size",
    "--gbs": "global_batch_size", "--lr": "lr", "--min-lr": "min_lr", "--seq-len": "seq_len",
    "--pad-len": "pad_len", "--pr": "pr", "--tp": "tp", "--pp": "pp", "--vpp": "vpp",
    "--cp": "cp", "--ep": "ep", "--etp": "etp", "--sp": "sp", "--do": "do", "--fl": "fl",
    "--ac": "ac", "--optimizer-offload": "optimizer_offload", "--packing": "packing",
    "--save-interval": "save_interval", "--data-path": "dataset_path",
    "--valid-data-path": "valid_dataset_path", "--load": "pretrain_checkpoint_path",
    "--save": "save_path", "--train-tokens": "train_tokens", "--warmup-tokens": "warmup_tokens",
    "--train-iters": "iterations", "--warmup-iters": "warmup_iterations",
    "--output": "output_basepath", "--mode": "mode", "--lora": "lora",
}
_SWITCHES = ("sp", "do", "fl", "packing")  # a bare --sp means --sp true
_PATHS = ("dataset_path", "valid_dataset_path")  # may be a blend: several words


def _named_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, dest in NAMED_FLAGS.items():
        if dest in _SWITCHES:
            parser.add_argument(flag, dest=dest, nargs="?", const="true")
        elif dest in _PATHS:
            parser.add_argument(flag, dest=dest, nargs="+")
        else:
            parser.add_argument(flag, dest=dest)
    return parser


def _parse_named(values: list[str]) -> tuple[dict[str, object], list[str]]:
    """Launcher settings from named flags, and the remaining (Megatron) flags in order."""
    namespace, extra = _named_parser().parse_known_args(values)
    labels = {dest: flag for flag, dest in NAMED_FLAGS.items()}
    given = {}
    for dest, text in vars(namespace).items():
        if text is None:
            continue
        if dest in _PATHS:
            given[dest] = " ".join(text)
        else:
            given[dest] = _convert(dest, text, labels[dest])
    return given, extra


# Pai's last two counts are tokens, or iterations when fine-tuning.
_COUNTS = {("TRAIN_TOKENS_OR_ITERS", False): "train_tokens",
           ("TRAIN_TOKENS_OR_ITERS", True): "iterations",
           ("WARMUP_TOKENS_OR_ITERS", False): "warmup_tokens",
           ("WARMUP_TOKENS_OR_ITERS", True): "warmup_iterations"}


@dataclass(frozen=True)
class ParsedLaunch:
    """What a launcher command line says: settings, mode, and the flags for Megatron."""

    settings: RunSettings
    mode: str  # pretrain | finetune
    extra: list[str]


def parse_launch(values: Sequence[str], layout: str = "pai",
                 mode: str | None = None) -> ParsedLaunch:
    """Positions in ``layout``'s order, then named flags and Megatron flags.

    ``mode`` is fixed by the run_pretrain/run_finetune scripts; for ``run_mcore`` it comes from
    ``--mode``, the SFT position or the ``MODE`` environment variable (default pretrain), which
    must agree where several are given.
    """
    names = LAYOUTS[layout]
    values = list(values)
    count = next((i for i, v in enumerate(values) if v.startswith("--")), len(values))
    if count > len(names):
        raise LaunchError(f"at most {len(names)} positional arguments ({' '.join(names)}), "
                          f"got {count}")
    named, extra = _parse_named(values[count:])
    positional = dict(zip(names, values[:count]))
    sources: dict[str, str] = {}
    if mode is not None:
        sources["the script"] = MODES[mode]
    if "mode" in named:
        sources["--mode"] = named.pop("mode")
    if "SFT" in positional:
        sources["SFT"] = "finetune" if _convert("sft", positional.pop("SFT")) else "pretrain"
    if mode is None and os.environ.get("MODE"):
        sources["MODE"] = _convert("mode", os.environ["MODE"], "MODE")
    if len(set(sources.values())) > 1:
        raise LaunchError("conflicting modes: " + ", ".join(
            f"{source} says {'sft' if value == 'finetune' else value}"
            for source, value in sources.items()))
    mode = next(iter(sources.values()), "pretrain")
    settings = {}
    for name, text in positional.items():
        field = _COUNTS.get((name, mode == "finetune"), name.lower())
        settings[field] = _convert(field, text, name)
    settings.update(named)
    return ParsedLaunch(RunSettings(**{**MODE_DEFAULTS.get(mode, {}), **settings}), mode, extra)


def parse_positional(values: Sequence[str],
                     mode: str = "pretrain") -> tuple[RunSettings, list[str]]:
    """Settings from Pai's original positional order (and named flags) plus Megatron flags."""
    parsed = parse_launch(values, "pai", mode)
    return parsed.settings, parsed.extra

