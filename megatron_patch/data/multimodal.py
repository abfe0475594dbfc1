"""Multimodal SFT data: ShareGPT-style conversations with ``<image>`` placeholders and images.

A record (one JSON line)::

    {"id": "cat-1", "images": ["img/cat.png"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

``messages`` / ``role`` / ``content`` turns and a top-level ``system`` are accepted as for text
SFT (:mod:`.sft_format`); ``image`` may hold a single path. Each ``<image>`` is the next image
of ``images`` (paths relative to the data file); a record's placeholders and images must agree
in number. The conversation is rendered with the tokenizer's chat template and the loss covers
the assistant turns only (:mod:`.sft_encoder`). For LLaVA each ``<image>`` becomes one image
token, which the model expands to the image's embeddings (Qwen2-VL's expansion:
:mod:`.qwen2_vl`). Images are read with Pillow, converted to RGB (transparency onto white),
resized to the vision tower's square input and normalised (CLIP's mean and std by default).

A missing or unreadable image, a placeholder count that does not match, or a sample longer
than ``--seq-length`` once its images are expanded is reported with the sample's id (its
``"id"``, else its line): skipped and listed (``on_error="skip"``) or fatal (``"fail"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


def record_images(record: dict) -> list[str]:
    """The image paths of a record (``images``, or a single ``image``), as written."""
    images = record.get("images", [record["image"]] if "image" in record else [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError("'images' is not a list of paths")
    return images


def encode_conversation(tokenizer: Tokenizer, record: dict,
                        image_ids: Callable[[int], Sequence[int]]
                        ) -> tuple[numpy.ndarray, numpy.ndarray, list[str]]:
    """Token ids, assistant mask and image paths of a record: the ``k``-th ``<image>`` becomes
    the tokens ``image_ids(k)``, out of the loss."""
    messages = record_messages(record)
    images = record_images(record)
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
            ids.append(numpy.asarray(image_ids(number), dtype=numpy.int32))
            mask.append(numpy.zeros(len(ids[-1]), dtype=numpy.uint8))
        start += len(piece) + len(IMAGE_PLACEHOLDER)
    ids_array, mask_array = numpy.concatenate(ids), numpy.concatenate(mask)
    if not mask_array.any():
        raise RecordError("no assistant tokens after tokenization")
    return ids_array, mask_array, images


def open_rgb(path: Path, sample_id: str):
    """An image file as an RGB PIL image, transparency composited onto white (as
    transformers' image processors do); a missing or unreadable file names the sample."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if "A" in image.getbands() or "transparency" in image.info:
                image = image.convert("RGBA")
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, image).convert("RGB")
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{sample_id}: image {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{sample_id}: image {path} is not a readable image ({error})") from None


def load_image(path: Path, size: int, sample_id: str,
               mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
               ) -> torch.Tensor:
    """``[3, size, size]`` normalised pixels of an image file; errors name the sample."""
    from PIL import Image

    image = open_rgb(path, sample_id).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 255.0)
    pixels = (pixels - torch.tensor(mean)) / torch.tensor(std)
    return pixels.permute(2, 0, 1).contiguous()


def check_image(path: Path) -> tuple[int, int]:
    """``(width, height)`` of a readable image file (:class:`RecordError` otherwise)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
            return size
    except FileNotFoundError:
        raise RecordError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise RecordError(f"image {path} is not a readable image ({error})") from None


def read_samples[T](path: Path, on_error: str, encode: Callable[[dict, str], T]
                    ) -> list[T]:
    """``encode(record, sample_id)`` of every JSON line of ``path``; a record that raises
    :class:`RecordError` or ``ValueError`` is skipped and listed, or fatal (``on_error``)."""
    bad = BadRecords(str(path), on_error)
    samples = []
    for line, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        record: object = None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise RecordError("not a JSON object")
            samples.append(encode(record, _sample_id(record, line)))
        except (RecordError, ValueError) as error:
            bad.add(_sample_id(record, line), str(error))
    bad.finish()
    if not samples:
        raise DataError(f"{path}: no usable sample")
    return samples


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

        def encode(record: dict, sample_id: str) -> MultimodalSample:
            ids, mask, images = encode_conversation(tokenizer, record,
                                                   lambda k: [image_token_id])
            paths = tuple(self.path.parent / p for p in images)
            for image in paths:
                check_image(image)
            length = len(ids) + len(paths) * (image_tokens - 1)
            if length > seq_length:
                raise RecordError(f"{length} tokens with its images expanded, more than "
                                  f"--seq-length {seq_length}")
            return MultimodalSample(sample_id, ids, mask, paths)

        self.samples = read_samples(self.path, on_error, encode)
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
