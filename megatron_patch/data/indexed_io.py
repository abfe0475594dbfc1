"""Write Megatron indexed datasets atomically: temporary files, renamed only on success."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_patch.utils.files import fsync_path


def dataset_files(prefix: str | Path) -> tuple[Path, Path]:
    """The ``.bin`` and ``.idx`` files of a dataset prefix."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


@contextmanager
def atomic_builder(prefix: str | Path,
                   dtype: type[numpy.number]) -> Iterator[IndexedDatasetBuilder]:
    """An ``IndexedDatasetBuilder`` whose ``{prefix}.bin/.idx`` appear only if the block succeeds.

    Both files are written under hidden temporary names beside the targets and fsynced; on
    success the ``.idx`` is renamed first and the ``.bin`` last, so an existing ``.bin`` implies
    its ``.idx``, even after a crash.
    On any error the temporary files are removed and nothing at ``prefix`` changes.
    """
    bin_path, idx_path = dataset_files(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = (path.with_name(f".{path.name}.{os.getpid()}.tmp")
                        for path in (bin_path, idx_path))
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    try:
        yield builder
        builder.finalize(str(tmp_idx))
        fsync_path(tmp_bin)
        fsync_path(tmp_idx)
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_bin, bin_path)
        fsync_path(bin_path.parent)
    except BaseException:
        builder.data_file.close()
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
