"""Packed (THD) sequences for the torch attention: rows and a block-diagonal causal mask.

With ``PackedSeqParams(qkv_format="thd")`` Megatron-Core flattens a micro-batch of ``b`` rows of
``s`` tokens into one sequence of ``t = b * s`` tokens (``[t, heads, dim]`` into core attention),
``cu_seqlens_q`` marking every document, and applies RoPE per document so positions restart.
``tokens_per_sample = s`` says that documents never cross row boundaries (Megatron's flattening
of a micro-batch, ``flatten_batch_for_packed_sequences``). The torch attention therefore attends
row by row, ``[s, b, heads, dim]`` with a ``[b, 1, s, s]`` mask, instead of over all ``t``
tokens at once: ``b`` times less work and memory than one ``t x t`` mask. The mask is
materialised (a boolean per query/key pair of a row).
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the segment (document) holding each of the first ``total`` packed tokens."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous().to(positions.dtype), positions,
                              right=True)


def document_causal_mask(cu_seqlens: torch.Tensor, rows: int, row_length: int) -> torch.Tensor:
    """``[rows, 1, s, s]`` Megatron attention mask (True = masked): causal within documents."""
    segments = segment_ids(cu_seqlens, rows * row_length).view(rows, row_length)
    positions = torch.arange(row_length, device=cu_seqlens.device)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (positions[:, None]
                                                                >= positions[None, :])
    return ~allowed[:, None]


def unpack_thd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, params: PackedSeqParams
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[t, heads, dim]`` THD inputs as ``[s, b, heads, dim]`` rows, and their document mask."""
    if params.qkv_format != "thd":
        raise ValueError(f"packed sequences in {params.qkv_format!r} format are not supported "
                         "by SDPAttention; expected 'thd'")
    if attention_mask is not None:
        raise ValueError("packed sequences define their own attention mask; pass "
                         "attention_mask=None with packed_seq_params")
    cu_seqlens = params.cu_seqlens_q if params.cu_seqlens_q_padded is None \
        else params.cu_seqlens_q_padded
    total = query.shape[0]
    row_length = params.tokens_per_sample or total
    if total % row_length:
        raise ValueError(f"{total} packed tokens are not rows of tokens_per_sample={row_length}")
    rows = total // row_length

    def as_rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(rows, row_length, *tensor.shape[1:]).transpose(0, 1)

    mask = document_causal_mask(cu_seqlens, rows, row_length)
    return as_rows(query), as_rows(key), as_rows(value), mask


def pack_thd(output: torch.Tensor) -> torch.Tensor:
    """``[s, b, hidden]`` attention output back in THD token order, ``[b * s, 1, hidden]``."""
    return output.transpose(0, 1).reshape(-1, 1, output.shape[-1])
