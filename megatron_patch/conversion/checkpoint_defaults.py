"""What a Megatron checkpoint says about its model: family, architecture, tokenizer, vocabulary.

A converted checkpoint records them in ``megatron_patch.json`` (and holds the HF tokenizer
files); a checkpoint saved by training holds its Megatron args, whose architecture is read back
through the family's config mapping (the round trip ``convert mcore-to-hf`` makes). Both give
Megatron argument defaults, so ``--load`` of either builds the same model with the same
tokenizer and padded vocabulary unless flags say otherwise.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from megatron_patch.tokenizer.hf import TOKENIZER_FILES
from megatron_patch.utils.metadata import TRACKER_FILE, checkpoint_metadata


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds HF tokenizer files."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def saved_args(load: str | Path) -> argparse.Namespace | None:
    """The Megatron args saved in the checkpoint ``load``'s tracker names (None: none saved)."""
    from megatron_patch.conversion.mcore_to_hf import checkpoint_directory, open_checkpoint

    return open_checkpoint(checkpoint_directory(Path(load))).args


def saved_model_defaults(load: str | Path) -> dict[str, Any]:
    """Megatron argument defaults for a checkpoint written by training (no metadata file).

    The architecture is the family's reading of the saved args (``megatron_to_hf`` then
    ``hf_to_megatron``); the tokenizer and vocabulary padding are the saved ones.
    """
    from megatron_patch.models.registry import get_family

    saved = saved_args(load)
    if saved is None:
        raise ValueError(f"{load}: the checkpoint holds no Megatron args and no "
                         "megatron_patch.json; pass --hf-config-path or the model flags")
    family = get_family(getattr(saved, "model_family", None) or "llama")
    saved = copy.copy(saved)
    saved.vocab_size = saved.vocab_size or saved.padded_vocab_size
    defaults = {**family.hf_to_megatron(family.megatron_to_hf(saved)), "model_family": family.name,
                "make_vocab_size_divisible_by": saved.make_vocab_size_divisible_by}
    if getattr(saved, "patch_tokenizer_type", None):
        # the tokenizer training used: its path, else its HF config or loaded checkpoint directory
        path = (saved.patch_tokenizer_path or getattr(saved, "hf_config_path", None)
                or saved.load)
        defaults.update(patch_tokenizer_type=saved.patch_tokenizer_type,
                        patch_tokenizer_path=path)
    return defaults


def converted_model_defaults(load: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Megatron argument defaults of a converted checkpoint (its ``megatron_patch.json``)."""
    from megatron_patch.models.registry import get_family

    family = get_family(metadata["family"])
    defaults = {**family.hf_to_megatron(metadata["hf_config"]), "model_family": family.name,
                "make_vocab_size_divisible_by": metadata["make_vocab_size_divisible_by"]}
    if has_tokenizer(load):
        defaults.update(patch_tokenizer_type="HFTokenizer",
                        patch_tokenizer_path=str(Path(load).resolve()))
    return defaults


def checkpoint_model_defaults(load: str | Path) -> dict[str, Any] | None:
    """Defaults of a converted or trained checkpoint; None if ``load`` holds no checkpoint yet."""
    metadata = checkpoint_metadata(load)
    if metadata:
        return converted_model_defaults(load, metadata)
    if not (Path(load) / TRACKER_FILE).is_file():
        return None
    return saved_model_defaults(load)
