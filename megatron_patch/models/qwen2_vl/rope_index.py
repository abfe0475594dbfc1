"""M-RoPE position ids of Qwen2-VL / Qwen2.5-VL inputs (transformers' ``get_rope_index``).

Shared with the data pipeline (``megatron_patch/data``): compute the ``[3, S]`` positions of each
document here rather than re-implementing them.

Every token has a (temporal, height, width) position. Text tokens have the same value on all
three axes, one more than the previous token's largest. An image's ``t * h * w / merge**2``
tokens (one per merged patch, row-major over the merged grid) sit on a grid starting at the
running position: temporal ``start + i_t``, height ``start + i_h``, width ``start + i_w``;
the text after the image continues at ``start + max(h, w) / merge``. Unlike transformers, which
groups consecutive image tokens into one image, each image here takes exactly its own number
of tokens, so two adjacent images are positioned as two (the processor never writes them
adjacently, so both agree on its output).
"""

from __future__ import annotations

import torch


def image_token_count(grid_thw: torch.Tensor | tuple[int, int, int], merge: int) -> int:
    """Language-model tokens of one image with patch grid ``(t, h, w)``."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge * merge)


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    image_token_id: int, merge: int, start: int = 0) -> torch.Tensor:
    """``[3, S]`` positions of one sequence ``input_ids [S]`` whose images (in order) have the
    patch grids ``image_grid_thw [n, 3]``; positions begin at ``start``.

    Raises ``ValueError`` if the image tokens do not make up exactly those images.
    """
    ids = input_ids.reshape(-1)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g) for g in image_grid_thw]
    is_image = (ids == image_token_id).tolist()
    pieces, position, i, image = [], start, 0, 0
    while i < len(is_image):
        if not is_image[i]:
            end = i
            while end < len(is_image) and not is_image[end]:
                end += 1
            pieces.append(torch.arange(position, position + end - i).expand(3, -1))
            position += end - i
            i = end
            continue
        if image == len(grids):
            raise ValueError(f"image token at position {i} after the {len(grids)} image(s) of "
                             "image_grid_thw are used up")
        t, h, w = grids[image]
        count = image_token_count((t, h, w), merge)
        if not all(is_image[i:i + count]) or len(is_image[i:i + count]) != count:
            raise ValueError(f"image {image} (grid {t}x{h}x{w}) needs {count} consecutive image "
                             f"tokens from position {i}")
        grid_t, grid_h, grid_w = torch.meshgrid(torch.arange(t), torch.arange(h // merge),
                                                torch.arange(w // merge), indexing="ij")
        pieces.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + position)
        position += max(h, w) // merge
        i += count
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} images in image_grid_thw but tokens for {image}")
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1).to(torch.long)


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
               image_token_id: int, merge: int) -> torch.Tensor:
    """``[3, B, S]`` positions of a batch ``input_ids [B, S]``; ``image_grid_thw`` lists the
    images of all rows in order (row 0's first)."""
    grids = [] if image_grid_thw is None else list(image_grid_thw)
    rows, used = [], 0
    for row in input_ids:
        tokens = int((row == image_token_id).sum())
        mine, count = [], 0
        while count < tokens and used < len(grids):
            mine.append(grids[used])
            count += image_token_count(grids[used], merge)
            used += 1
        stacked = torch.stack([torch.as_tensor(g) for g in mine]) if mine else None
        rows.append(mrope_positions(row, stacked, image_token_id, merge))
    if used != len(grids):
        raise ValueError(f"{len(grids)} images in image_grid_thw but tokens for {used}")
    return torch.stack(rows, dim=1).to(input_ids.device)
