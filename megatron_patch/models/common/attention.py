"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for Megatron-Core's ``DotProductAttention`` (same constructor and forward signature):
causal and GQA attention without materialising an ``s x s`` mask, so torch picks its fused
kernels (flash / cuDNN / memory-efficient on GPUs, the fused CPU kernel otherwise).

Sliding-window attention follows ``config.window_size = (left, 0)`` with Transformer Engine's
meaning: query ``i`` attends keys ``i - left .. i``. It is applied as a boolean mask.

Packed sequences (``PackedSeqParams``, THD) attend row by row under a block-diagonal causal mask
built from ``cu_seqlens`` (``models/common/packed_seq.py``).

Context parallelism gathers the sequence's keys and values over the CP group
(``models/common/context_parallel.py``) and masks by the queries' global positions.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_patch.models.common.context_parallel import gather_sequence, local_positions
from megatron_patch.models.common.packed_seq import pack_thd, unpack_thd


class SDPAttention(MegatronModule):
    """Scaled-dot-product core attention for [s, b, heads, dim] inputs."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        self.window_left = _window_left(config)
        if pg_collection is None:
            required = ["tp", "cp"] if config.context_parallel_size > 1 else ["tp"]
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=required)
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.tp_rank, tp_size = pg_collection.tp.rank(), pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_groups = divide(config.num_query_groups, tp_size)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Attend [sq, b, np, hn] queries to [sk, b, ng, hn] keys/values -> [sq, b, np*hn]."""
        if packed_seq_params is not None:  # THD [t, heads, hn] -> rows + document mask
            query, key, value, attention_mask = unpack_thd(query, key, value, attention_mask,
                                                           packed_seq_params)
        mask_type = attn_mask_type or self.attn_mask_type
        if self.cp_group is not None:
            key, value = self._gather_context(key, value, attention_mask, packed_seq_params)
        q_pos, k_pos = self._positions(query.shape[0], key.shape[0], query.device,
                                       always=attention_bias is not None)
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # Megatron masks are True where attention is forbidden
        if self.window_left is not None or self.cp_group is not None:
            left = key.shape[0] if self.window_left is None else self.window_left
            window = _window_mask(q_pos, k_pos, left)
            mask = window if mask is None else mask & window
            causal = False
        bias = self.position_bias(q_pos, k_pos) if self.uses_position_bias else None
        if attention_bias is not None:
            bias = attention_bias if bias is None else bias + attention_bias
        if bias is not None:
            if causal:  # SDPA takes a float bias or is_causal, not both
                mask, causal = _window_mask(q_pos, k_pos, key.shape[0]), False
            bias = bias.to(query.dtype)
            mask = bias if mask is None else torch.where(mask, bias, -1e30)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        dropout = self.dropout_p if self.training else 0.0
        # Dropout on TP-sharded heads draws from the model-parallel RNG stream, as Megatron does.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout else nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=self.num_heads != self.num_groups,
            )
        sq, b = out.shape[2], out.shape[0]
        out = out.permute(2, 0, 1, 3).reshape(sq, b, -1)
        return out if packed_seq_params is None else pack_thd(out)

    uses_position_bias = False  # subclasses that add a bias (ALiBi) set it

    def position_bias(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Additive score bias ``[1, heads, sq, sk]`` from query and key positions."""
        raise NotImplementedError

    def _positions(self, sq: int, sk: int, device: torch.device, always: bool = False
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Global positions of the queries and keys, when a mask or bias needs them (or
        ``always``).

        Without context parallelism the queries are the last ``sq`` of the ``sk`` keys (all of
        them in training and prefill, the new ones when decoding with a KV cache).
        """
        if not (always or self.cp_group is not None or self.window_left is not None
                or self.uses_position_bias):
            return None, None
        if self.cp_group is not None:
            queries = local_positions(sq, self.cp_group.size(), self.cp_group.rank(), device)
        else:
            queries = torch.arange(sk - sq, sk, device=device)
        return queries, torch.arange(sk, device=device)

    def _gather_context(self, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None,
                        packed_seq_params: PackedSeqParams | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sequence's keys and values from every context-parallel rank."""
        if attention_mask is not None or packed_seq_params is not None:
            raise ValueError("context parallelism without Transformer Engine supports causal "
                             "attention over whole sequences only (no explicit attention mask, "
                             "no packed sequences); set --context-parallel-size 1")
        return gather_sequence(key, self.cp_group), gather_sequence(value, self.cp_group)


def _window_left(config: TransformerConfig) -> int | None:
    """Left extent of the attention window, None for full causal attention."""
    if config.window_size is None:
        return None
    if config.window_attn_skip_freq is not None:
        raise ValueError("window_attn_skip_freq is not supported by SDPAttention")
    left, right = config.window_size
    if left < 0 or right != 0:
        raise ValueError(
            f"window_size={tuple(config.window_size)} is not supported by SDPAttention; "
            "expected (left >= 0, 0)"
        )
    return int(left)


def _window_mask(queries: torch.Tensor, keys: torch.Tensor, left: int) -> torch.Tensor:
    """Causal sliding-window mask [sq, sk] for query/key positions, True where query i may
    attend key j (``i - left <= j <= i``)."""
    q, k = queries[:, None], keys[None, :]
    return (k <= q) & (k >= q - left)
