"""The Qwen2-VL / Qwen2.5-VL vision tower on Megatron-Core layers, and its patch merger.

Semantics are transformers' (``Qwen2VisionTransformerPretrainedModel``,
``Qwen2_5_VisionTransformerPretrainedModel``):

- **Patches** arrive flattened, ``[N, C * T * P * P]`` (the image processor's layout; patches of
  a ``merge x merge`` block are consecutive). The 3-D convolution with kernel = stride = the
  patch is a linear map of that vector (``patch_embed``, no bias).
- **2-D rotary embedding**: a patch at row ``y``, column ``x`` of its image's grid rotates the
  first half of each head's channel pairs by ``y`` and the second half by ``x`` (frequencies
  ``theta ** (-2i / (head_dim / 2))``), as Megatron's non-interleaved rotary applies them.
- **Attention** is bidirectional within an image (one frame of a video), never across images.
  Qwen2.5-VL attends within windows of ``window_size / patch / merge`` merged patches squared,
  except in the ``fullatt_block_indexes`` layers; the patches are reordered window by window
  before the layers (:func:`window_order`) and restored after them.
- **Merger**: a norm over each patch, the ``merge**2`` patches of a block concatenated, then
  ``Linear -> GELU -> Linear`` into the language model's width.

Images attend to each other through a boolean block-diagonal ``[1, 1, N, N]`` mask (none when
there is only one image); the layers are called one by one because Qwen2.5-VL's masks differ
by layer.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.models.common.norm import PatchNorm
from megatron_patch.models.common.packed_seq import segment_ids

NORM_EPS = 1e-6  # transformers hard-codes the tower's and the merger's norm epsilon


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """``[N, 2]`` (row, column) of every patch, in the processor's order (``merge x merge``
    blocks row-major, patches row-major inside a block; frames one after another)."""
    rows = []
    for t, h, w in grid_thw.tolist():
        y = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        x = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        pairs = torch.stack([y.transpose(1, 2).reshape(-1), x.transpose(1, 2).reshape(-1)], -1)
        rows.append(pairs.repeat(t, 1))
    return torch.cat(rows).to(grid_thw.device)


def frame_bounds(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts ``[0, n_0, n_0 + n_1, ...]`` of every frame of every image."""
    sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])


def window_order(grid_thw: torch.Tensor, merge: int, window: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window grouping of merged patches.

    Each frame's grid of merged patches is tiled from its top-left corner by ``window x
    window`` tiles (the last row and column of tiles may be cut short); tiles are taken row by
    row and the merged patches inside a tile row by row. Returns ``(order, bounds)``: ``order
    [M]`` lists merged-patch indices (over all images) in that order; ``bounds`` are the
    cumulative patch (not merged-patch) counts of the non-empty tiles, starting at 0.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        nh, nw = math.ceil(gh / window), math.ceil(gw / window)
        index = torch.full((t, nh * window, nw * window), -1, dtype=torch.long)
        index[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        tiles = index.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4)
        tiles = tiles.reshape(t * nh * nw, window * window)
        lengths.append((tiles >= 0).sum(1))
        order.append(tiles[tiles >= 0])
        offset += t * gh * gw
    sizes = torch.cat(lengths)
    sizes = sizes[sizes > 0] * merge * merge
    bounds = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    return torch.cat(order).to(grid_thw.device), bounds.to(grid_thw.device)


def block_mask(bounds: torch.Tensor, total: int) -> torch.Tensor | None:
    """``[1, 1, total, total]`` Megatron mask (True = masked) keeping attention inside the
    segments ``bounds``; None when there is a single segment."""
    if bounds.numel() <= 2:
        return None
    segment = segment_ids(bounds, total)
    return (segment[:, None] != segment[None, :])[None, None]


class Qwen2VisionTower(MegatronModule):
    """Patch embedding and transformer layers (see the module docstring); the output is the
    last layer's ``[N, hidden]`` patch states in the input order (no final norm)."""

    def __init__(self, config: TransformerConfig, spec: ModuleSpec, *, patch_features: int,
                 merge: int, rope_theta: float, window: int | None = None,
                 full_attention_layers: tuple[int, ...] = (), vp_stage: int | None = None):
        super().__init__(config=config)
        self.merge, self.window = merge, window
        self.full_attention_layers = set(full_attention_layers)
        self.patch_embed = torch.nn.Linear(patch_features, config.hidden_size, bias=False,
                                           dtype=config.params_dtype)
        self.decoder = TransformerBlock(config, spec, pre_process=True, post_process=False,
                                        vp_stage=vp_stage)
        self.rope_theta = rope_theta

    def rotary(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[N, 1, 1, head_dim]`` rotation angles of the patches (input order)."""
        positions = patch_positions(grid_thw, self.merge).to(torch.float32)
        half = self.config.kv_channels // 2  # each axis rotates half of the channels
        inverse = 1.0 / self.rope_theta ** (
            torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half)
        angles = (positions[:, :, None] * inverse).flatten(1)  # [N, rows then columns]
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[N, C*T*P*P]`` patches of the images ``grid_thw [n, 3]`` -> ``[N, hidden]``."""
        total = pixel_values.shape[0]
        unit = self.merge * self.merge
        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        rotary = self.rotary(grid_thw)
        images = block_mask(frame_bounds(grid_thw), total)
        windows, order = images, None
        if self.window is not None:
            order, bounds = window_order(grid_thw, self.merge, self.window)

            def reorder(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(total // unit, unit, *x.shape[1:])[order].reshape(x.shape)

            hidden, rotary = reorder(hidden), reorder(rotary)
            windows = block_mask(bounds, total)
        hidden = hidden.unsqueeze(1)  # [s, b=1, h]
        for index, layer in enumerate(self.decoder.layers):
            full = self.window is None or index in self.full_attention_layers
            hidden, _ = layer(hidden, attention_mask=images if full else windows,
                              rotary_pos_emb=rotary)
        hidden = hidden.squeeze(1)
        if order is not None:  # back to the input order
            restored = torch.empty_like(order)
            restored[order] = torch.arange(order.numel(), device=order.device)
            hidden = hidden.reshape(total // unit, unit, -1)[restored].reshape(total, -1)
        return hidden


class PatchMerger(MultimodalProjector):
    """``ln_q`` over each patch, ``merge**2`` patches concatenated, then the projector MLP
    (``encoder.linear_fc1`` / ``encoder.linear_fc2``) into the language model's width."""

    def __init__(self, config: TransformerConfig, vision_config: TransformerConfig,
                 merge: int):
        width = vision_config.hidden_size * merge * merge
        super().__init__(config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                               linear_fc2=RowParallelLinear), "mlp", width)
        self.width = width
        self.ln_q = PatchNorm(vision_config, vision_config.hidden_size, eps=NORM_EPS)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` patches -> ``[N / merge**2, language hidden]``."""
        return super().forward(self.ln_q(hidden_states).view(-1, self.width))
