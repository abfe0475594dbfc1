"""Qwen2-VL / Qwen2.5-VL dynamic-resolution images: Pillow in, ViT patches out.

An image keeps (about) its aspect ratio and size: it is resized so that both sides are
multiples of ``patch_size * merge_size`` and its area lies within ``[min_pixels, max_pixels]``
(:func:`smart_resize`, Qwen's rule), normalised with CLIP's mean and std, and cut into
``grid_h * grid_w`` patches of ``patch_size`` squared pixels. A still image is one temporal
patch: each patch repeats its pixels ``temporal_patch_size`` times. The patch order and the
feature layout (``[C, T, P, P]`` flattened) are those of transformers'
``Qwen2VLImageProcessor``: patches are grouped by ``merge_size`` x ``merge_size`` blocks (the
units the model's patch merger concatenates), blocks in row-major order. The language model
sees ``grid_t * grid_h * grid_w / merge_size**2`` image tokens per image.

``min_pixels`` / ``max_pixels`` come from the model's ``preprocessor_config.json`` (its
``min_pixels``/``max_pixels`` or ``size.shortest_edge``/``size.longest_edge``) when there is
one, else the processor's defaults; ``--vlm-min-pixels`` / ``--vlm-max-pixels`` override both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from megatron_patch.data.multimodal import CLIP_MEAN, CLIP_STD, open_rgb

PREPROCESSOR_CONFIG = "preprocessor_config.json"
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to: multiples of ``factor``, nearest to the
    original, scaled (keeping the aspect ratio) into ``[min_pixels, max_pixels]``."""
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise ValueError(f"{width}x{height} pixels: aspect ratio above {MAX_ASPECT_RATIO}")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


@dataclass(frozen=True)
class ImagePatcher:
    """How one model turns images into patches (see the module docstring)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @property
    def patch_dim(self) -> int:
        """Features of one patch: ``3 * temporal_patch_size * patch_size**2``."""
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """``(grid_t, grid_h, grid_w)`` of an image of ``width`` x ``height`` pixels."""
        new_h, new_w = smart_resize(height, width, self.patch_size * self.merge_size,
                                    self.min_pixels, self.max_pixels)
        return 1, new_h // self.patch_size, new_w // self.patch_size

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """Image tokens of the language model for ``grid``."""
        return math.prod(grid) // self.merge_size ** 2

    def patches(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``([grid_t*grid_h*grid_w, patch_dim] float32 patches, grid)`` of an RGB PIL image."""
        from PIL import Image

        t, gh, gw = grid = self.grid(*image.size)
        p, m = self.patch_size, self.merge_size
        resized = image.resize((gw * p, gh * p), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(numpy.asarray(resized, dtype=numpy.float32) / 255.0)
        pixels = (pixels - torch.tensor(self.mean)) / torch.tensor(self.std)  # [H, W, C]
        blocks = pixels.reshape(gh // m, m, p, gw // m, m, p, 3)
        blocks = blocks.permute(0, 3, 1, 4, 6, 2, 5)  # block row, col, row in, col in, C, P, P
        blocks = blocks.unsqueeze(5).expand(*blocks.shape[:5], self.temporal_patch_size, p, p)
        return blocks.reshape(t * gh * gw, self.patch_dim).contiguous(), grid

    def load(self, path: Path, sample_id: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """:meth:`patches` of an image file; a missing or unreadable file names the sample."""
        return self.patches(open_rgb(path, sample_id))


def _preprocessor(directories: list[str | Path | None]) -> tuple[dict, Path | None]:
    for directory in directories:
        if directory and (Path(directory) / PREPROCESSOR_CONFIG).is_file():
            path = Path(directory) / PREPROCESSOR_CONFIG
            try:
                return json.loads(path.read_text()), path
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error})") from None
    return {}, None


def image_patcher(hf_config: dict, directories: list[str | Path | None],
                  min_pixels: int | None = None, max_pixels: int | None = None
                  ) -> ImagePatcher:
    """The patcher of a Qwen2-VL ``config.json`` with the first ``preprocessor_config.json``
    found in ``directories``; explicit ``min_pixels`` / ``max_pixels`` win."""
    vision = hf_config.get("vision_config") or {}
    shapes = {"patch_size": vision.get("patch_size", 14),
              "temporal_patch_size": vision.get("temporal_patch_size", 2),
              "merge_size": vision.get("spatial_merge_size", 2)}
    pre, path = _preprocessor(directories)
    for key, value in shapes.items():
        if key in pre and pre[key] != value:
            raise ValueError(f"{path}: {key}={pre[key]} but the model's config.json has "
                             f"{value}")
    size = pre.get("size") or {}
    low = min_pixels or pre.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS
    high = max_pixels or pre.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS
    if low > high:
        raise ValueError(f"min_pixels {low} is larger than max_pixels {high} "
                         f"({path or '--vlm-min-pixels/--vlm-max-pixels'})")
    return ImagePatcher(**shapes, min_pixels=int(low), max_pixels=int(high),
                        mean=tuple(pre.get("image_mean", CLIP_MEAN)),
                        std=tuple(pre.get("image_std", CLIP_STD)))
