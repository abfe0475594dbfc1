"""Input records for preprocessing: JSON lines, parquet rows, or whole ``.txt`` files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# A record is (location, kind, payload): kind "json" (raw line bytes), "text" (raw file bytes,
# the document under key "text") or "row" (a parquet row, or an item of a ``.json`` file holding
# one JSON array). Locations name the file and line/row/item so that malformed input can be
# reported precisely.
Record = tuple[str, str, object]
INPUT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


def input_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the input files under a directory (recursively, sorted)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        raise FileNotFoundError(f"--input {path} does not exist (expected a .jsonl, .parquet or "
                                "directory of .jsonl/.txt files)")
    if not files:
        raise FileNotFoundError(f"--input {path}: no {'/'.join(INPUT_SUFFIXES)} files in it")
    for file in files:
        if file.suffix == ".parquet":
            _pyarrow_parquet(file)  # fail before any work if pyarrow is missing
    return files


def _pyarrow_parquet(file: Path) -> ModuleType:
    """``pyarrow.parquet`` (an optional dependency), or an error saying how to install it."""
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError(f"reading {file} needs pyarrow: pip install 'megatron-patch[parquet]'"
                          ) from error
    return pyarrow.parquet


def _json_lines(file: Path) -> Iterator[Record]:
    with open(file, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            yield f"{file}:{number}", "json", line


def _is_json_array(file: Path) -> bool:
    """Whether a ``.json`` file holds one JSON array (else it is read as JSON lines)."""
    with open(file, "rb") as handle:
        return handle.read(4096).lstrip()[:1] == b"["


def _json_array_items(file: Path) -> Iterator[Record]:
    try:
        items = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        yield str(file), "json", file.read_bytes()  # reported as bad JSON by the parser
        return
    for number, item in enumerate(items, start=1):
        yield f"{file}:item {number}", "row", item


def _parquet_rows(file: Path, keys: list[str]) -> Iterator[Record]:
    table = _pyarrow_parquet(file).ParquetFile(file)
    columns = [key for key in keys if key in table.schema_arrow.names]
    number = 0
    if not columns:  # every row lacks the keys; report them row by row like any other
        for number in range(1, table.metadata.num_rows + 1):
            yield f"{file}:row {number}", "row", {}
        return
    for batch in table.iter_batches(columns=columns):
        for row in batch.to_pylist():
            number += 1
            yield f"{file}:row {number}", "row", row


def read_records(files: list[Path], keys: list[str]) -> Iterator[Record]:
    """All records of ``files``, in file order then line/row order."""
    for file in files:
        if file.suffix == ".parquet":
            yield from _parquet_rows(file, keys)
        elif file.suffix == ".txt":
            yield str(file), "text", file.read_bytes()
        elif file.suffix == ".json" and _is_json_array(file):
            yield from _json_array_items(file)
        else:
            yield from _json_lines(file)
