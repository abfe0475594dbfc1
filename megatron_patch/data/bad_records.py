"""Malformed input records: counted, the first few listed by location, or fatal (``--on-error``)."""

from __future__ import annotations

import sys
from collections.abc import Callable

MAX_REPORTED = 20  # malformed records listed one by one; the rest are only counted
ON_ERROR = ("skip", "fail")


class DataError(RuntimeError):
    """Input data stopped a run: a malformed record with ``on_error="fail"``, or nothing usable."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class BadRecords:
    """Collects malformed records of one run; ``on_error="fail"`` raises at the first one."""

    def __init__(self, name: str, on_error: str, write: Callable[[str], None] = _stderr) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.name = name
        self.on_error = on_error
        self.write = write
        self.count = 0

    def add(self, location: str, reason: str) -> None:
        """Record one malformed record (raises :class:`DataError` when failing on errors)."""
        if self.on_error == "fail":
            raise DataError(f"{location}: {reason}")
        if self.count < MAX_REPORTED:
            self.write(f"{self.name}: skipped {location}: {reason}")
        self.count += 1

    def finish(self) -> None:
        """Say how many skipped records were not listed one by one."""
        if self.count > MAX_REPORTED:
            self.write(f"{self.name}: {self.count - MAX_REPORTED} more malformed records "
                       f"skipped; first {MAX_REPORTED} listed above")
