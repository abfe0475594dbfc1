"""The surface every tokenizer here offers; Megatron's datasets duck-type against it."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    """Base class: ``vocab_size``, ``eod``, ``pad``, ``tokenize``/``detokenize``, cache identity.

    Subclasses set ``base_vocab_size``, ``eod`` and ``pad`` in ``__init__``. Instances pickle as
    their constructor arguments, so worker processes rebuild them from the files cheaply.
    """

    base_vocab_size: int
    eod: int
    pad: int

    def __init__(self, path: str | None, extra_vocab_size: int = 0) -> None:
        if extra_vocab_size < 0:
            raise ValueError(f"extra_vocab_size must be >= 0, got {extra_vocab_size}")
        self.path = path
        self.extra_vocab_size = extra_vocab_size

    @property
    def vocab_size(self) -> int:
        """Tokenizer vocabulary (special and added tokens included) plus the extra rows."""
        return self.base_vocab_size + self.extra_vocab_size

    @property
    def unique_identifiers(self) -> dict[str, str | int | None]:
        """Identity used by Megatron's dataset cache keys (JSON-serialisable)."""
        path = str(Path(self.path).resolve()) if self.path is not None else None
        return {"class": type(self).__name__, "tokenizer_path": path,
                "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ``ids``."""
        raise NotImplementedError

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.extra_vocab_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size})"


def require_file(kind: str, path: str | None, default_name: str) -> Path:
    """``path`` itself if it is a file, else ``path/default_name``; a clear error if missing."""
    if path is None:
        raise ValueError(f"{kind} needs a path: a {default_name} file or a directory holding one")
    given = Path(path).expanduser()
    file = given / default_name if given.is_dir() else given
    if not file.is_file():
        where = f"in directory {given}" if given.is_dir() else f"at {given}"
        raise FileNotFoundError(f"{kind}: no {default_name} file {where} (expected a "
                                f"{default_name} file or a directory holding one)")
    return file
