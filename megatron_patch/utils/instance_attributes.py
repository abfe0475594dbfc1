"""Setting attributes on object instances for the length of a ``with`` block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def instance_attributes(replacements: Iterable[tuple[object, str, Any]]) -> Iterator[None]:
    """Set each ``(obj, name, value)`` on its instance; restore afterwards exactly what the
    instance itself held (an earlier replacement stays, a class attribute shows through again)."""
    replacements = list(replacements)
    missing = object()
    previous = [(obj, name, vars(obj).get(name, missing)) for obj, name, _ in replacements]
    for obj, name, value in replacements:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(previous):
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
