"""Megatron checkpoints on disk: finding and opening one (any format), and what a converted
release records (its vocabulary sizes and Megatron args). Shared by the text and the
vision-language converters in both directions."""

from __future__ import annotations

import argparse
import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_patch.conversion.legacy import LegacyCheckpoint
from megatron_patch.conversion.torch_dist import TorchDistCheckpoint
from megatron_patch.mapping.config import MegatronArgs
from megatron_patch.models.vocab import needed_vocab_rows, padded_vocab_size
from megatron_patch.utils.metadata import TRACKER_FILE

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")


def checkpoint_directory(mcore_dir: Path) -> Path:
    """The directory of the checkpoint ``latest_checkpointed_iteration.txt`` points at.

    ``mcore_dir`` may also be a checkpoint directory itself (``release/``, ``iter_0000100/``).
    """
    tracker = mcore_dir / TRACKER_FILE
    if not tracker.is_file():
        if (mcore_dir / "metadata.json").is_file() or next(mcore_dir.glob("mp_rank_*"), None):
            return mcore_dir
        raise FileNotFoundError(f"{mcore_dir}: no {TRACKER_FILE} and no checkpoint files")
    text = tracker.read_text().strip()
    directory = mcore_dir / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not directory.is_dir():
        raise FileNotFoundError(f"{tracker} points at {directory}, which does not exist")
    return directory


def open_checkpoint(directory: Path) -> TorchDistCheckpoint | LegacyCheckpoint:
    """A reader for a ``torch_dist`` or legacy checkpoint directory."""
    if dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        return TorchDistCheckpoint(directory)
    return LegacyCheckpoint(directory)


def tokenizer_size(hf_dir: Path) -> int | None:
    """Tokens of the HF tokenizer in ``hf_dir`` (added tokens included); None without one."""
    if not any(next(hf_dir.glob(pattern), None) for pattern in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(hf_dir))
    except (OSError, ValueError) as exc:
        warnings.warn(f"{hf_dir}: tokenizer not loadable ({exc}); sizing the vocabulary from the "
                      "embedding rows", stacklevel=2)
        return None


@dataclass(frozen=True)
class VocabSizes:
    """How the vocabulary was sized (recorded in the metadata)."""

    hf_vocab_rows: int  # rows of the HF embedding
    tokenizer_vocab_size: int | None
    extra_vocab_size: int
    vocab_rows: int  # rows that carry tokens: max(HF rows, tokenizer + extra); kept on export
    make_vocab_size_divisible_by: int
    padded_vocab_size: int  # Megatron's embedding rows


def size_vocabulary(hf_dir: Path, hf_rows: int, extra: int, divisible_by: int,
                    tp: int) -> VocabSizes:
    """Vocabulary rows from the HF embedding, its tokenizer and ``--extra-vocab-size``."""
    tokens = tokenizer_size(hf_dir)
    rows = needed_vocab_rows(tokens or hf_rows, hf_rows, extra)
    return VocabSizes(hf_rows, tokens, extra, rows, divisible_by,
                      padded_vocab_size(rows, divisible_by, tp))


def stored_args(args: argparse.Namespace, layout: MegatronArgs, dtype: torch.dtype
                ) -> argparse.Namespace:
    """The args stored in the checkpoint: as parsed, with the layout it was written for."""
    saved = copy.copy(args)
    vars(saved).update(layout)
    saved.virtual_pipeline_model_parallel_size = layout.get("num_virtual_stages_per_pipeline_rank")
    saved.params_dtype = dtype
    return saved
