"""SFT training rows: samples packed (or padded) into sequences of exactly ``seq_length`` tokens.

A sample of ``n`` tokens ``x_0 .. x_{n-1}`` with assistant mask ``a`` fills ``n`` positions:
position ``i`` reads ``x_i``, predicts ``x_{i+1}`` and counts in the loss when ``a_{i+1}`` (or
always, with ``train_on_prompt``); its last position predicts nothing. Padding fills the rest of
the row with the tokenizer's pad id, out of the loss.

Packed rows also carry Megatron's packed-sequence description, as Megatron-LM's SFT dataset
does: ``cu_seqlens`` (int32 cumulative lengths of the row's samples, then of the padding as one
more segment, right-filled with ``seq_length`` to a fixed ``seq_length + 1`` entries so rows
collate) and ``max_seqlen``; ``position_ids`` restart at 0 in every segment.
"""

from __future__ import annotations

import numpy
import torch

Sample = tuple[numpy.ndarray, numpy.ndarray]


def pack_first_fit(lengths: numpy.ndarray, capacity: int, window: int = 64) -> list[list[int]]:
    """Group item positions into rows of at most ``capacity`` tokens.

    Items are taken in the given order and each goes to the first of the last ``window`` rows
    with room for it, else to a new row (first fit over a bounded window: near-optimal density,
    linear time, and rows keep the input's random order). Every item must fit a row alone.
    """
    rows: list[list[int]] = []
    space = numpy.empty(len(lengths), dtype=numpy.int64)
    for item, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"item {item} has {length} tokens, more than a row ({capacity})")
        low = max(0, len(rows) - window)
        fits = numpy.flatnonzero(space[low:len(rows)] >= length)
        if fits.size:
            row = low + int(fits[0])
            rows[row].append(item)
            space[row] -= length
        else:
            space[len(rows)] = capacity - length
            rows.append([item])
    return rows


def build_row(samples: list[Sample], seq_length: int, pad_id: int, *, train_on_prompt: bool,
              packed: bool) -> dict[str, torch.Tensor]:
    """One training row of ``samples`` (a single, possibly truncated, sample when not packed)."""
    tokens = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    labels = numpy.full(seq_length, pad_id, dtype=numpy.int64)
    loss_mask = numpy.zeros(seq_length, dtype=numpy.float32)
    position_ids = numpy.arange(seq_length, dtype=numpy.int64)
    cu_seqlens = [0]
    for ids, mask in samples:
        start = cu_seqlens[-1]
        n = min(len(ids), seq_length - start)
        tokens[start:start + n] = ids[:n]
        targets = ids[1:n + 1]
        labels[start:start + len(targets)] = targets
        loss_mask[start:start + len(targets)] = 1.0 if train_on_prompt else mask[1:n + 1]
        position_ids[start:start + n] = numpy.arange(n)
        cu_seqlens.append(start + n)
    row = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
           "position_ids": position_ids}
    if packed:
        used = cu_seqlens[-1]
        position_ids[used:] = numpy.arange(seq_length - used)
        bounds = numpy.full(seq_length + 1, seq_length, dtype=numpy.int32)
        bounds[:len(cu_seqlens)] = cu_seqlens
        row["cu_seqlens"] = bounds
        row["max_seqlen"] = numpy.int32(numpy.diff(cu_seqlens + [seq_length]).max())
    return {key: torch.from_numpy(numpy.asarray(value)) for key, value in row.items()}
