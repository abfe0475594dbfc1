"""Qwen2-VL / Qwen2.5-VL multimodal SFT data: dynamic-resolution images, M-RoPE positions.

Records are those of :mod:`.multimodal` (ShareGPT or ``messages`` conversations with
``<image>`` placeholders, assistant-only loss). Each image is read at its own resolution
(:mod:`.qwen2_vl_images`) and its ``<image>`` becomes ``<|vision_start|>``, one
``<|image_pad|>`` per merged patch, ``<|vision_end|>`` (token ids from the model's
``config.json``), as transformers' Qwen2-VL processor writes them. Positions are M-RoPE's
``[3, S]`` (temporal, height, width) ids of transformers' ``get_rope_index``
(:mod:`megatron_patch.models.qwen2_vl.rope_index`).

A row of ``seq_length`` tokens holds one sample, padded, or with ``packing`` several (first
fit), each with its own positions from 0 and, in ``cu_seqlens``, its own attention segment
(:func:`.packing.build_row`). A micro-batch (:meth:`Qwen2VLSFTDataset.collate`) stacks the
rows and concatenates their images' patches: ``pixel_values [patches, patch_dim]`` and
``image_grid_thw [images, 3]`` in row order, ``position_ids [3, B, S]``.

A missing or unreadable image, a placeholder count that does not match the images, image
tokens written in the text, or a sample longer than ``seq_length`` with its images expanded
is reported with the sample's id, skipped or fatal (``on_error``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from megatron_patch.data.bad_records import DataError
from megatron_patch.data.encoder import RecordError
from megatron_patch.data.multimodal import (
    check_image,
    encode_conversation,
    read_samples,
    record_images,
)
from megatron_patch.data.packing import build_row, pack_first_fit
from megatron_patch.data.qwen2_vl_images import ImagePatcher
from megatron_patch.models.qwen2_vl.rope_index import image_token_count, mrope_positions
from megatron_patch.tokenizer import Tokenizer

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class VisionTokens:
    """Token ids around and inside an image's span of the sequence."""

    start: int
    image: int
    end: int

    @classmethod
    def from_hf(cls, hf_config: dict) -> VisionTokens:
        """The ids of a Qwen2-VL ``config.json`` (top level, or ``text_config`` in some
        exports)."""
        keys = ("vision_start_token_id", "image_token_id", "vision_end_token_id")
        text = hf_config.get("text_config") or {}
        values = [hf_config.get(key, text.get(key)) for key in keys]
        missing = [key for key, value in zip(keys, values) if value is None]
        if missing:
            raise ValueError(f"config.json: {', '.join(missing)} missing (needed to write the "
                             "image tokens)")
        return cls(*(int(v) for v in values))


@dataclass(frozen=True)
class Qwen2VLSample:
    """One encoded conversation: ids with expanded image spans, assistant mask, its images and
    their patch grids."""

    sample_id: str
    ids: numpy.ndarray
    mask: numpy.ndarray
    images: tuple[Path, ...]
    grids: tuple[Grid, ...]

    def positions(self, image_token_id: int, merge: int) -> torch.Tensor:
        """M-RoPE positions ``[3, n]`` (computed when a row is built, not kept)."""
        return mrope_positions(torch.from_numpy(self.ids.astype(numpy.int64)),
                               torch.tensor(self.grids) if self.grids else None,
                               image_token_id, merge)


def encode_sample(tokenizer: Tokenizer, record: dict, sample_id: str, *, root: Path,
                  patcher: ImagePatcher, tokens: VisionTokens) -> Qwen2VLSample:
    """A record as a :class:`Qwen2VLSample` (images are checked and sized, not decoded)."""
    paths = tuple(root / p for p in record_images(record))
    grids = tuple(patcher.grid(*check_image(path)) for path in paths)

    def span(k: int) -> list[int]:
        return [tokens.start] + [tokens.image] * patcher.tokens(grids[k]) + [tokens.end]

    ids, mask, _ = encode_conversation(tokenizer, record, span)
    expected = sum(image_token_count(g, patcher.merge_size) for g in grids)
    if int((ids == tokens.image).sum()) != expected:
        raise RecordError(f"the text holds image tokens (id {tokens.image}) of its own; use "
                          "<image> placeholders")
    return Qwen2VLSample(sample_id, ids, mask, paths, grids)


class Qwen2VLSFTDataset(torch.utils.data.Dataset):
    """Rows of ``seq_length`` tokens from a JSONL file of conversations with images.

    Item: ``tokens``, ``labels`` (the next token), ``loss_mask`` (the next token is an
    assistant token), ``position_ids [3, seq_length]`` (the padding at the end, which no
    real token attends to, has :func:`.packing.build_row`'s 1-D positions), the row's
    ``pixel_values`` and ``image_grid_thw``; with ``packing`` also ``cu_seqlens`` and
    ``max_seqlen``. Use :meth:`collate` as the data loader's ``collate_fn``.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, *, patcher: ImagePatcher,
                 tokens: VisionTokens, seq_length: int, pad_id: int, packing: bool = False,
                 on_error: str = "fail"):
        self.path, self.patcher, self.packing = Path(path), patcher, packing
        self.seq_length, self.pad_id, self.image_token_id = seq_length, pad_id, tokens.image

        def encode(record: dict, sample_id: str) -> Qwen2VLSample:
            sample = encode_sample(tokenizer, record, sample_id, root=self.path.parent,
                                   patcher=patcher, tokens=tokens)
            if len(sample.ids) > seq_length:
                raise RecordError(f"{len(sample.ids)} tokens with its images expanded, more "
                                  f"than --seq-length {seq_length}")
            return sample

        self.samples = read_samples(self.path, on_error, encode)
        if packing:
            lengths = numpy.asarray([len(s.ids) for s in self.samples])
            self.rows = pack_first_fit(lengths, seq_length)
        else:
            self.rows = [[k] for k in range(len(self.samples))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        samples = [self.samples[k] for k in self.rows[index]]
        row = build_row([(s.ids, s.mask) for s in samples], self.seq_length, self.pad_id,
                        train_on_prompt=False, packed=self.packing)
        positions = row.pop("position_ids").expand(3, -1).clone()
        start = 0
        for sample in samples:
            positions[:, start:start + len(sample.ids)] = sample.positions(
                self.image_token_id, self.patcher.merge_size)
            start += len(sample.ids)
        patches, grids = [], []
        for sample in samples:
            for path, grid in zip(sample.images, sample.grids):
                pixels, found = self.patcher.load(path, sample.sample_id)
                if found != grid:
                    raise DataError(f"{sample.sample_id}: image {path} changed size since "
                                      "the data was read")
                patches.append(pixels)
                grids.append(grid)
        row["position_ids"] = positions
        row["pixel_values"] = torch.cat(patches) if patches else \
            torch.zeros(0, self.patcher.patch_dim)
        row["image_grid_thw"] = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        return row

    @staticmethod
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A micro-batch: rows stacked, ``position_ids`` as ``[3, B, S]``, images
        concatenated in row order."""
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]
                 if key not in ("pixel_values", "image_grid_thw", "position_ids")}
        batch["position_ids"] = torch.stack([item["position_ids"] for item in items], dim=1)
        for key in ("pixel_values", "image_grid_thw"):
            batch[key] = torch.cat([item[key] for item in items])
        return batch
