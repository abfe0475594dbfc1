"""Multimodal SFT data: ShareGPT-style conversations with ``<image>`` placeholders and images.

A record (one JSON line)::

    {"id": "cat-1", "images": ["img/cat.png"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

``messages`` / ``role`` / ``content`` turns and a top-level ``system`` are accepted as for text
SFT (:mod:`.sft_format`); ``image`` may hold a single path. Each ``<image>`` is the next image
of ``images`` (paths relative to the data file); a record's placeholders and images must agree
in number. The conversation is rendered with the tokenizer's chat template and the loss covers
the assistant turns only (:mod:`.sft_encoder`). Each ``<image>`` becomes one image token, which
the model expands to the image's embeddings. Images are read with Pillow, converted to RGB,
resized to the vision tower's square input and normalised (CLIP's mean and std by default).

A missing or unreadable image, a placeholder count that does not match, or a sample longer
than ``--seq-length`` once its images are expanded is reported with the sample's id (its
``"id"``, else its line): skipped and listed (``on_error="skip"``) or fatal (``"fail"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from megatron_patch.data.bad_records import BadRecords, DataError
from megatron_patch.data.encoder import RecordError
from megatron_patch.data.sft_encoder import assistant_spans, tokenize_spans
from megatron_patch.data.sft_format import record_messages
from megatron_patch.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class MultimodalSample:
    """One encoded conversation: token ids (one image token per image), assistant mask, the
    images' paths and the sample's id for error messages."""

    sample_id: str
    ids: numpy.ndarray
    mask: numpy.ndarray
    images: tuple[Path, ...]


def _sample_id(record: object, line: int) -> str:
    if isinstance(record, dict) and isinstance(record.get("id"), str | int):
        return f"sample {record['id']!r} (line {line})"
    return f"line {line}"


def encode_conversation(tokenizer: Tokenizer, record: dict, image_token_id: int
                        ) -> tuple[numpy.ndarray, numpy.ndarray, list[str]]:
    """Token ids (each ``<image>`` one ``image_token_id``), assistant mask, image paths."""
    messages = record_messages(record)
    images = record.get("images", [record["image"]] if "image" in record else [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError("'images' is not a list of paths")
    text, spans = assistant_spans(tokenizer, messages)
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise RecordError(f"{len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but "
                          f"{len(images)} images")
    ids, mask, start = [], [], 0
    for number, piece in enumerate(pieces):
        local = [(max(a, start) - start, min(b, start + len(piece)) - start) for a, b in spans
                 if a < start + len(piece) and b > start]
        piece_ids, piece_mask = tokenize_spans(tokenizer, piece, local)
        ids.append(piece_ids)
        mask.append(piece_mask)
        if number < len(images):
            ids.append(numpy.asarray([image_token_id], dtype=numpy.int32))
            mask.append(numpy.zeros(1, dtype=numpy.uint8))
        start += len(piece) + len(IMAGE_PLACEHOLDER)
    ids_array, mask_array = numpy.concatenate(ids), numpy.concatenate(mask)
    if not mask_array.any():
        raise RecordError("no assistant tokens after tokenization")
    return ids_array, mask_array, images


def load_image(path: Path, size: int, sample_id: str,
               mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
               ) -> torch.Tensor:
    """``[3, size, size]`` normalised pixels of an image file; errors name the sample."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise DataError(f"{sample_id}: image {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{sample_id}: image {path} is not a readable image ({error})") from None
    pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 255.0)
    pixels = (pixels - torch.tensor(mean)) / torch.tensor(std)
    return pixels.permute(2, 0, 1).contiguous()


def _check_image(path: Path, sample_id: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        raise RecordError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise RecordError(f"image {path} is not a readable image ({error})") from None


class MultimodalSFTDataset(torch.utils.data.Dataset):
    """Conversations of a JSONL file as fixed-size micro-batch items.

    Item: ``tokens``, ``labels`` (the next token), ``loss_mask`` (next token is an assistant
    token) of ``seq_length`` text positions, padded; ``images`` ``[max_images, 3, size, size]``
    (zero-padded) and ``num_images``. Samples whose text plus expanded images exceed
    ``seq_length`` are refused: the model's sequence is cut at ``seq_length``.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, *, image_token_id: int,
                 image_tokens: int, image_size: int, seq_length: int, pad_id: int,
                 on_error: str = "fail"):
        self.path = Path(path)
        self.image_size, self.seq_length, self.pad_id = image_size, seq_length, pad_id
        bad = BadRecords(str(self.path), on_error)
        self.samples: list[MultimodalSample] = []
        for line, raw in enumerate(self.path.read_text().splitlines(), start=1):
            if not raw.strip():
                continue
            record: object = None
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise RecordError("not a JSON object")
                ids, mask, images = encode_conversation(tokenizer, record, image_token_id)
                paths = tuple(self.path.parent / p for p in images)
                for image in paths:
                    _check_image(image, _sample_id(record, line))
                length = len(ids) + len(paths) * (image_tokens - 1)
                if length > seq_length:
                    raise RecordError(f"{length} tokens with its images expanded, more than "
                                      f"--seq-length {seq_length}")
            except (RecordError, ValueError) as error:
                bad.add(_sample_id(record, line), str(error))
                continue
            self.samples.append(MultimodalSample(_sample_id(record, line), ids, mask, paths))
        bad.finish()
        if not self.samples:
            raise DataError(f"{self.path}: no usable sample")
        self.max_images = max(len(s.images) for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        length = self.seq_length
        tokens = torch.full((length,), self.pad_id, dtype=torch.long)
        labels = torch.full((length,), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(length, dtype=torch.float)
        n = min(len(sample.ids), length)
        tokens[:n] = torch.from_numpy(sample.ids[:n].astype(numpy.int64))
        labels[: n - 1] = tokens[1:n]
        loss_mask[: n - 1] = torch.from_numpy(sample.mask[1:n].astype(numpy.float32))
        images = torch.zeros(max(self.max_images, 1), 3, self.image_size, self.image_size)
        for k, path in enumerate(sample.images):
            images[k] = load_image(path, self.image_size, sample.sample_id)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "images": images,
                "num_images": torch.tensor(len(sample.images))}
