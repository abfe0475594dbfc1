"""Model outputs for RLHF: per-token log-probabilities and value-head scores, at any TP/PP.

Both are Megatron-Core ``GPTModel`` output processors (``model(..., output_processor=f,
output_processor_context=ctx)``): they receive the last stage's final-norm hidden states, so the
model's forward, pipeline schedule and checkpoint layout stay Megatron-Core's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_patch.training.loop import next_batch


@dataclass(frozen=True)
class LogprobContext:
    """How logits become log-probabilities: real vocabulary rows and sampling temperature."""

    vocab_rows: int
    temperature: float = 1.0


def token_logprobs(*, hidden_states: torch.Tensor, output_layer, output_weight,
                   labels: torch.Tensor, scale_logits, context: LogprobContext,
                   **_) -> torch.Tensor:
    """``log p(labels[b, s] | tokens[b, :s+1])`` [batch, seq] from this TP rank's logits shard.

    Padding rows of the vocabulary (beyond ``context.vocab_rows``) are excluded from the softmax,
    so the values equal an unpadded model's (e.g. Hugging Face's).
    """
    logits, _ = output_layer(hidden_states, weight=output_weight)  # [s, b, vocab / tp]
    logits = scale_logits(logits).float()
    if context.temperature != 1.0:
        logits = logits / context.temperature
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard > context.vocab_rows:
        columns = torch.arange(start, start + shard, device=logits.device)
        logits = logits.masked_fill(columns >= context.vocab_rows, float("-inf"))
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
    return -nll.transpose(0, 1).contiguous()


def value_scores(*, hidden_states: torch.Tensor, context: torch.nn.Module,
                 **_) -> torch.Tensor:
    """The value head ``context`` on every position [batch, seq] (sequence parallel gathered)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1 and \
            getattr(context, "sequence_parallel", False):
        hidden_states = gather_from_sequence_parallel_region(hidden_states)
    return context(hidden_states).squeeze(-1).transpose(0, 1).float()


def forward_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     context: LogprobContext) -> torch.Tensor:
    """Per-token log-probabilities of ``batch['labels']`` (last stage; hidden states elsewhere)."""
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 output_processor=token_logprobs, output_processor_context=context)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row of ``values`` where ``mask`` is set [rows]."""
    return (values * mask).sum(dim=-1)


def collect_outputs(key: str):
    """A Megatron loss function that only reports ``output`` (for forward-only passes)."""
    return partial(_report, key)


def _report(key: str, output: torch.Tensor):
    return output.new_zeros(()), torch.ones((), dtype=torch.int), {key: output.detach()}


def policy_forward_step(data_iterator: Iterator, model: torch.nn.Module, *,
                        context: LogprobContext, loss_func: Callable, args: argparse.Namespace):
    """Megatron forward step of the policy: per-token log-probabilities, reduced by
    ``loss_func(batch, args, output)`` (DPO, GRPO and PPO losses)."""
    batch = next_batch(data_iterator)
    return forward_logprobs(model, batch, context), partial(loss_func, batch, args)

