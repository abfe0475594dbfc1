"""Qwen-1 style tiktoken BPE (``qwen.tiktoken``: one ``base64-token rank`` pair per line)."""

from __future__ import annotations

import base64
import binascii
import unicodedata
from pathlib import Path

from megatron_patch.tokenizer.base import Tokenizer, require_file

# Qwen-1's pre-tokenisation pattern and special tokens (ids follow the BPE ranks, in order).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                       *(f"<|extra_{i}|>" for i in range(205)))
MAX_RANK = 2**31 - len(QWEN_SPECIAL_TOKENS)  # the special ids follow; token ids are int32


def load_ranks(file: Path) -> dict[bytes, int]:
    """The ``token -> rank`` table of a tiktoken BPE file; errors name the file and line.

    Tokens and ranks must be distinct, ranks in ``[0, MAX_RANK)`` (token ids are int32) and
    every single byte a token: the tiktoken library aborts the process (a Rust panic) on
    duplicate ranks or a byte it cannot encode, rather than raising.
    """
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for number, line in enumerate(file.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except (ValueError, binascii.Error) as error:
            raise ValueError(f"TikTokenizer: {file}:{number} is not a 'base64-token rank' "
                             f"line: {line[:80]!r}") from error
        problem = (f"rank out of [0, {MAX_RANK})" if not 0 <= rank < MAX_RANK
                   else "duplicate token" if token in ranks
                   else "duplicate rank" if rank in seen else None)
        if problem:
            raise ValueError(f"TikTokenizer: {file}:{number}: {problem}: {line[:80]!r}")
        ranks[token] = rank
        seen.add(rank)
    if not ranks:
        raise ValueError(f"TikTokenizer: {file} holds no BPE ranks")
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ValueError(f"TikTokenizer: {file} lacks {len(missing)} of the 256 single-byte "
                         f"tokens (e.g. byte {missing[0]:#04x}); a byte-level BPE table needs all")
    return ranks


class TikTokenizer(Tokenizer):
    """Qwen-1 tokenizer: ``qwen.tiktoken`` ranks + ``<|endoftext|>``, ``<|im_start|>``, ... ."""

    def __init__(self, path: str | None, extra_vocab_size: int = 0) -> None:
        super().__init__(path, extra_vocab_size)
        import tiktoken

        file = require_file(type(self).__name__, path, "qwen.tiktoken")
        ranks = load_ranks(file)
        first_special = max(ranks.values()) + 1
        specials = {token: first_special + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(name=f"qwen-{file.stem}", pat_str=QWEN_PATTERN,
                                           mergeable_ranks=ranks, special_tokens=specials)
        self.base_vocab_size = self._encoding.n_vocab
        self.eod = self.pad = specials["<|endoftext|>"]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of NFC-normalised ``text`` (special-token strings become their ids)."""
        return self._encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ``ids``."""
        return self._encoding.decode(list(ids))
