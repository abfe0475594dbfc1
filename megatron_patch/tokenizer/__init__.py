"""Tokenizers for preprocessing and training: one small registry, one ``build_tokenizer``.

Each tokenizer offers ``vocab_size`` (special tokens and ``extra_vocab_size`` included), ``eod``,
``pad``, ``tokenize``, ``detokenize`` and ``unique_identifiers`` -- what Megatron-Core's GPT
datasets read -- and Hugging Face ones ``apply_chat_template``.
"""

from __future__ import annotations

from megatron_patch.tokenizer.base import Tokenizer
from megatron_patch.tokenizer.byte import ByteTokenizer
from megatron_patch.tokenizer.hf import TINY_TOKENIZER_DIR, HFTokenizer, TinyTokenizer
from megatron_patch.tokenizer.qwen_tiktoken import TikTokenizer
from megatron_patch.tokenizer.spm import SentencePieceTokenizer

TOKENIZERS: dict[str, type[Tokenizer]] = {
    "HFTokenizer": HFTokenizer,
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "TikTokenizer": TikTokenizer,
    "ByteTokenizer": ByteTokenizer,
    "TinyTokenizer": TinyTokenizer,
}


def build_tokenizer(tokenizer_type: str, path: str | None, extra_vocab_size: int = 0) -> Tokenizer:
    """The tokenizer of ``tokenizer_type`` (a key of ``TOKENIZERS``) from local ``path``."""
    try:
        cls = TOKENIZERS[tokenizer_type]
    except KeyError:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of "
                         f"{', '.join(TOKENIZERS)}") from None
    return cls(None if path is None else str(path), extra_vocab_size)


__all__ = ["TINY_TOKENIZER_DIR", "TOKENIZERS", "ByteTokenizer", "HFTokenizer",
           "SentencePieceTokenizer", "TikTokenizer", "TinyTokenizer", "Tokenizer",
           "build_tokenizer"]
