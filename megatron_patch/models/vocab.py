"""Padded vocabulary size, derived the same way by training and conversion."""

from __future__ import annotations


def padded_vocab_size(rows: int, divisible_by: int, tp_size: int) -> int:
    """Smallest size >= ``rows`` divisible by ``divisible_by * tp_size`` (Megatron's rule)."""
    multiple = max(1, divisible_by) * max(1, tp_size)
    return -(-rows // multiple) * multiple


def needed_vocab_rows(tokenizer_vocab: int | None, model_rows: int | None,
                      extra_vocab: int = 0) -> int:
    """Embedding rows a model needs: its own rows or tokenizer + extra, whichever is larger."""
    needed = max(filter(None, [tokenizer_vocab and tokenizer_vocab + extra_vocab, model_rows]),
                 default=None)
    if needed is None:
        raise ValueError("cannot size the vocabulary: give a tokenizer or --vocab-size")
    return needed


def resolve_padded_vocab(
    tokenizer_vocab: int | None,
    model_rows: int | None,
    extra_vocab: int,
    divisible_by: int,
    tp_size: int,
    recorded: int | None = None,
) -> int:
    """Embedding rows for training: the recorded size when it fits this TP, else derived.

    ``model_rows`` is the HF embedding size (may exceed the tokenizer, e.g. Qwen);
    ``recorded`` is what a converted checkpoint's metadata says it was padded to.
    """
    needed = needed_vocab_rows(tokenizer_vocab, model_rows, extra_vocab)
    if recorded is not None and recorded >= needed and recorded % tp_size == 0:
        return recorded
    return padded_vocab_size(needed, divisible_by, tp_size)
