"""Token selection: greedy, or sampling with temperature, top-k, top-p and a repetition penalty.

The logits processing follows Hugging Face ``generate`` exactly (the order of its processors and
each one's semantics; ``tests/generation`` checks both against transformers): the repetition
penalty divides positive and multiplies negative logits of every token already in the sequence
(prompt included, padding excluded), then temperature, top-k and top-p (nucleus) filtering.

Sampling draws from each row's own ``torch.Generator``, seeded with ``seed + index of the
prompt in the input``, so a prompt's sample does not depend on the batch it ran in, its
position in the batch, the batch size or the parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``greedy`` (or ``temperature == 0``): the arg-max."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        """Whether tokens are chosen by arg-max (no randomness)."""
        return self.greedy or self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Penalise the tokens marked in ``seen`` ([batch, vocab] bool): HF's repetition penalty."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p; removed tokens get ``-inf``. Float logits."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # HF's rule: drop a token when it and every less likely token together hold at most
        # 1 - top_p of the mass (summed from the least likely up, as HF does); keep the top one.
        mass_from_bottom = probs.flip(-1).cumsum(dim=-1).flip(-1)
        remove = mass_from_bottom <= 1.0 - params.top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def row_generators(seed: int, indices: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded by the prompt's index in the input."""
    return [torch.Generator(device=device).manual_seed(seed + index) for index in indices]


def select_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                  generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row from ``logits`` [batch, vocab]: arg-max or a sample.

    ``seen`` ([batch, vocab] bool) marks the tokens the repetition penalty applies to. A sample
    is the arg-max of ``probs / E`` with ``E ~ Exp(1)`` drawn per token from the row's
    generator (the exponential race: an exact draw from ``probs``).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.is_greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    noise = torch.stack([
        torch.empty(probs.shape[-1], device=probs.device).exponential_(generator=generator)
        for generator in generators])
    return (probs / noise).argmax(dim=-1)
