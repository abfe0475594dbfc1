"""Output directories that appear all at once, and the files a model carries besides weights."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Tokenizer, chat template, generation and image-processor settings: copied along in both
# directions.
MODEL_FILE_PATTERNS = ("tokenizer*.json", "*.model", "*.tiktoken",
                       "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json",
                       "added_tokens.json", "chat_template.json", "chat_template.jinja",
                       "generation_config.json", "preprocessor_config.json")


def copy_model_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer files, chat template, generation and image-processor configs; returns
    the names copied."""
    copied = set()
    for pattern in MODEL_FILE_PATTERNS:
        for file in Path(src).glob(pattern):
            if file.is_file():
                shutil.copy2(file, Path(dst) / file.name)
                copied.add(file.name)
    return sorted(copied)


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's contents and metadata to stable storage."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (itself included), children first."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` all at once: temporary file, fsync, rename, fsync dir.

    A crash at any moment leaves either the old or the new content, never a partial file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a scratch directory beside ``out`` that becomes ``out`` only on success.

    An interrupted or failed conversion leaves nothing at ``out`` (the scratch directory is
    removed); ``out`` must not exist or be empty. Everything is fsynced before the rename, and
    the rename itself after it, so a crash never leaves a partly written ``out``.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield scratch
        fsync_tree(scratch)
        if out.exists():
            out.rmdir()
        scratch.rename(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
