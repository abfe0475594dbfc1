"""UTF-8 bytes as tokens: ids 0-255 are the bytes, 256 ends a document. No files needed."""

from __future__ import annotations

from megatron_patch.tokenizer.base import Tokenizer


class ByteTokenizer(Tokenizer):
    """256 byte ids plus an end-of-document id (also used for padding); ``path`` is ignored."""

    def __init__(self, path: str | None = None, extra_vocab_size: int = 0) -> None:
        super().__init__(None, extra_vocab_size)
        self.base_vocab_size = 257
        self.eod = self.pad = 256

    def tokenize(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        """Decode the byte ids (other ids are dropped; invalid UTF-8 becomes U+FFFD)."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
