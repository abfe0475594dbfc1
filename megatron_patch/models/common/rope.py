"""Hugging Face RoPE variants that Megatron-Core's ``RotaryEmbedding`` lacks.

Megatron-Core computes plain rope, linear scaling (``seq_len_interpolation_factor``) and Llama
3.1's llama3 scaling (its constants fixed). transformers implements more rope types for the
llama-style families (``ROPE_INIT_FUNCTIONS`` in ``transformers.modeling_rope_utils``);
:data:`HF_ROPE_TYPES` are reproduced here from the HF rope dict (``rope_parameters`` or
``rope_scaling``), which the config mapping passes as ``--hf-rope-scaling``
(``PatchTransformerConfig.hf_rope_scaling``):

- inverse frequencies: :func:`inverse_frequencies`, the same arithmetic as transformers;
- attention scaling (yarn's mscale, longrope's attention factor): transformers multiplies cos
  and sin by it. Megatron-Core's attention multiplies them by ``_yarn_concentration_factor``
  wherever it applies rope (training, and its static-batching inference used by
  ``megatron_patch.generation``); :func:`set_attention_scaling` sets it. yarn and longrope
  models apply rope unfused (Transformer Engine's fused rope has no scale; the config turns
  ``apply_rope_fusion`` off for them).
- sequence-length dependent types (``dynamic``, ``longrope``): transformers picks the
  frequencies per forward from the largest position (``max(position_ids) + 1``). Here the
  length is the forward's rotary length: the sequence (gathered over sequence and context
  parallelism), the longest document of a packed batch, or the KV-cache width (prompt + new
  tokens) in generation. ``dynamic`` scales only beyond ``max_position_embeddings``, and
  Megatron trains at ``--seq-length <= --max-position-embeddings``, so training uses the
  unscaled frequencies, as transformers does at those lengths. ``longrope`` switches to its long
  factors beyond ``original_max_position_embeddings``, for training as in transformers.
  Generation past those thresholds uses the frequencies of the whole cache width from the
  first token on; transformers switches mid-generation while keeping earlier keys rotated with
  the old frequencies, which no fixed-frequency cache reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import Attention

# rope_type -> the fields transformers reads without a default (a missing one is a KeyError there).
HF_ROPE_FIELDS: dict[str, tuple[str, ...]] = {
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
HF_ROPE_TYPES = tuple(HF_ROPE_FIELDS)
# Types whose ``original_max_position_embeddings`` defaults to ``max_position_embeddings``.
USES_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def _plain(base: float | torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _dynamic(rope: Mapping[str, Any], base: float, dim: int, max_positions: int,
             seq_len: int | None) -> tuple[torch.Tensor, float]:
    factor = rope["factor"]
    # transformers: init-time frequencies from max_position_embeddings (Python floats); a longer
    # forward recomputes them from a tensor length (float32 arithmetic).
    length: int | torch.Tensor = max_positions
    if seq_len is not None and seq_len > max_positions:
        length = torch.tensor(seq_len)
    scaled = base * ((factor * length / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return _plain(scaled, dim), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: Mapping[str, Any], base: float, dim: int, max_positions: int,
          seq_len: int | None) -> tuple[torch.Tensor, float]:
    original = rope["original_max_position_embeddings"]
    factor = rope["factor"]
    if factor is None:
        factor = max_positions / original
    scale = rope.get("attention_factor")
    if scale is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        scale = (float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
                 if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs) * (1 - extrapolation)
                + 1.0 / pos_freqs * extrapolation)
    return inv_freq, scale


def _longrope(rope: Mapping[str, Any], base: float, dim: int, max_positions: int,
              seq_len: int | None) -> tuple[torch.Tensor, float]:
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:
        factor = max_positions / original
    scale = rope.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    factors = torch.tensor(rope["long_factor" if long else "short_factor"], dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (factors * base ** shape), scale


def _llama3(rope: Mapping[str, Any], base: float, dim: int, max_positions: int,
            seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = _plain(base, dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled), 1.0


_COMPUTE = {"dynamic": _dynamic, "yarn": _yarn, "longrope": _longrope, "llama3": _llama3}


def inverse_frequencies(rope: Mapping[str, Any], *, base: float, dim: int, max_positions: int,
                        seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [dim // 2], attention scaling)`` of an HF rope dict, as transformers computes
    them for ``dim`` rotary channels and a forward over ``seq_len`` positions (None: at init).

    ``original_max_position_embeddings`` defaults to ``max_positions`` (transformers' rule).
    Computed on the CPU (also while a model is built on the meta device).
    """
    if rope["rope_type"] in USES_ORIGINAL_LENGTH:
        rope = {**rope, "original_max_position_embeddings":
                rope.get("original_max_position_embeddings") or max_positions}
    with torch.device("cpu"):
        return _COMPUTE[rope["rope_type"]](rope, float(base), dim, max_positions, seq_len)


class HFRotaryEmbedding(RotaryEmbedding):
    """Megatron-Core's ``RotaryEmbedding`` with the frequencies of an HF rope dict.

    ``attention_scaling`` is the factor on cos and sin (see :func:`set_attention_scaling`).
    Everything else (CP slicing, packed sequences, caching, interleaving) is Megatron-Core's.
    """

    def __init__(self, rope: Mapping[str, Any], max_positions: int, kv_channels: int,
                 rotary_percent: float, rotary_base: float, **kwargs: Any) -> None:
        super().__init__(kv_channels, rotary_percent, rotary_base=rotary_base, **kwargs)
        self.rope = dict(rope)
        self.max_positions = max_positions
        self.base = float(rotary_base)
        self.dim = int(kv_channels * rotary_percent) if rotary_percent < 1.0 else kv_channels
        inv_freq, self.attention_scaling = self._frequencies(None)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def _frequencies(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        return inverse_frequencies(self.rope, base=self.base, dim=self.dim,
                                   max_positions=self.max_positions, seq_len=seq_len)

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """Angles [max_seq_len, dim // 2] of positions ``offset ..``, with the frequencies of a
        forward over ``offset + max_seq_len`` positions."""
        inv_freq = self.inv_freq
        if self.rope["rope_type"] in _LENGTH_DEPENDENT:
            inv_freq = self._frequencies(offset + max_seq_len)[0].to(inv_freq.device)
        seq = torch.arange(max_seq_len, device=inv_freq.device, dtype=inv_freq.dtype) + offset
        return torch.outer(seq, inv_freq)


def set_attention_scaling(model: torch.nn.Module, scale: float) -> None:
    """Multiply cos and sin by ``scale`` in every Megatron-Core attention of ``model``.

    Megatron-Core 0.19's ``Attention`` passes ``_yarn_concentration_factor`` (computed in its
    constructor from YaRN config fields our rope dicts do not use) as the ``mscale`` of every
    rope application; the HF-parity tests of yarn and longrope fail if that changes upstream.
    """
    for module in model.modules():
        if isinstance(module, Attention):
            module._yarn_concentration_factor = float(scale)
