"""Input records for preprocessing: JSON lines, parquet rows, or whole ``.txt`` files."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# A record is (location, kind, payload): kind "json" (raw line bytes), "text" (raw file bytes,
# the document under key "text"), "row" (a parquet row, or an item of a ``.json`` file holding
# one JSON array) or "error" (the reason the record cannot be read). Locations name the file and
# line/row/item so that malformed input can be reported precisely.
Record = tuple[str, str, object]
INPUT_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
# The most bytes read at once for one record (a JSON line, a .txt file, a .json array file):
# longer ones are reported as malformed, and the rest of an over-long line is skipped unread,
# so memory stays bounded whatever the input.
MAX_RECORD_BYTES = 256 * 2**20
_SKIP_CHUNK = 2**20
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(value: object) -> bool:
    """Whether decoded JSON holds an unpaired UTF-16 surrogate (text no tokenizer can encode)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def may_hold_surrogate(raw: bytes) -> bool:
    """Whether raw JSON has a ``\\uD800``-``\\uDFFF`` escape (else no surrogate can result)."""
    return _SURROGATE_ESCAPE.search(raw) is not None


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


def _too_long(size: int, limit: int) -> str:
    return f"{size} bytes, longer than the {limit} bytes a record may have"


def _json_lines(file: Path, limit: int) -> Iterator[Record]:
    """The lines of ``file``; one over ``limit`` bytes is reported, its rest skipped unread."""
    with open(file, "rb", buffering=_SKIP_CHUNK) as lines:
        number = 0
        while line := lines.readline(limit + 1):
            number += 1
            if len(line) <= limit or line.endswith(b"\n"):
                yield f"{file}:{number}", "json", line
                continue
            size = len(line)
            while (rest := lines.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                size += len(rest)
            size += len(rest)
            yield f"{file}:{number}", "error", _too_long(size, limit)


def _is_json_array(file: Path) -> bool:
    """Whether a ``.json`` file holds one JSON array (else it is read as JSON lines)."""
    with open(file, "rb") as handle:
        return handle.read(4096).lstrip()[:1] == b"["


def _json_array_items(file: Path, limit: int) -> Iterator[Record]:
    size = file.stat().st_size
    if size > limit:
        yield str(file), "error", _too_long(size, limit) + " (a JSON array is read whole; " \
            "write JSON lines instead)"
        return
    raw = file.read_bytes()
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):
        yield str(file), "json", raw  # reported as bad JSON by the parser
        return
    check_surrogates = may_hold_surrogate(raw)
    for number, item in enumerate(items, start=1):
        if check_surrogates and has_lone_surrogate(item):
            yield f"{file}:item {number}", "error", "text holds an unpaired UTF-16 surrogate"
        else:
            yield f"{file}:item {number}", "row", item


def _text_file(file: Path, limit: int) -> Record:
    size = file.stat().st_size
    if size > limit:
        return str(file), "error", _too_long(size, limit)
    return str(file), "text", file.read_bytes()


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


def read_records(files: list[Path], keys: list[str],
                 max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[Record]:
    """All records of ``files``, in file order then line/row order.

    No more than ``max_record_bytes`` are read for one record; longer ones become "error"
    records (reported with their location like any malformed record).
    """
    for file in files:
        if file.suffix == ".parquet":
            yield from _parquet_rows(file, keys)
        elif file.suffix == ".txt":
            yield _text_file(file, max_record_bytes)
        elif file.suffix == ".json" and _is_json_array(file):
            yield from _json_array_items(file, max_record_bytes)
        else:
            yield from _json_lines(file, max_record_bytes)
