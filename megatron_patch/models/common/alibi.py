"""ALiBi (attention with linear biases, Press et al. 2022) as a core-attention module.

Head ``h`` adds ``slope_h * (j - i)`` to the score of query ``i`` and key ``j``. Bloom and
Baichuan-13B add ``slope_h * j`` instead; that differs from ours by a constant per query row,
which softmax cancels, so the attention is the same (and ours stays small for long sequences).
The slopes are the geometric sequence of the paper, extended for head counts that are not a
power of two as Bloom/Baichuan do. Under tensor parallelism each rank adds the slopes of its own
heads. The bias is built by :func:`alibi_bias`, the one place that knows its layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_patch.models.common.attention import SDPAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi slope of every head (fp32), for any number of heads."""
    def powers_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers_of_two(closest)
    slopes += powers_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[heads, sq, sk]`` fp32 bias ``slope * (j - i)`` for query positions ``i`` and key
    positions ``j`` (1-D tensors).

    Not causally masked: the caller combines it with its mask.
    """
    distance = (keys[None, :] - queries[:, None]).to(torch.float32)
    return slopes.to(torch.float32)[:, None, None] * distance


class ALiBiAttention(SDPAttention):
    """:class:`SDPAttention` with the ALiBi bias of this tensor-parallel rank's heads."""

    uses_position_bias = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        first = self.tp_rank * self.num_heads
        self.slopes = alibi_slopes(self.config.num_attention_heads)[first:first + self.num_heads]

    def position_bias(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[1, local heads, sq, sk]`` ALiBi bias for these query and key positions."""
        return alibi_bias(self.slopes.to(queries.device), queries, keys)[None]
