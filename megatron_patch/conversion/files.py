"""Output directories that appear all at once, and the files a model carries besides weights."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Tokenizer, chat template and generation settings: copied along in both directions.
MODEL_FILE_PATTERNS = ("tokenizer*.json", "*.model", "*.tiktoken",
                       "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json",
                       "added_tokens.json", "chat_template.json", "chat_template.jinja",
                       "generation_config.json")


def copy_model_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer files, chat template and generation config; returns the names copied."""
    copied = set()
    for pattern in MODEL_FILE_PATTERNS:
        for file in Path(src).glob(pattern):
            if file.is_file():
                shutil.copy2(file, Path(dst) / file.name)
                copied.add(file.name)
    return sorted(copied)


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``out`` that becomes ``out`` only on success.

    An interrupted or failed conversion leaves nothing at ``out`` (the scratch directory is
    removed); ``out`` must not exist or be empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield scratch
        if out.exists():
            out.rmdir()
        scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
