"""Batched generation with a KV cache on a Megatron-Core ``GPTModel``, at any TP and PP.

The KV cache is Megatron-Core's own: a ``StaticInferenceContext`` passed to the model, whose
attention layers write each step's keys/values into preallocated ``[seq, batch, groups, dim]``
buffers (``Attention._adjust_key_value_for_inference``) and attend to all cached columns. Around
it this module runs its own loop: left-padded batches with a padding-aware attention mask and
per-row positions, HF-equivalent sampling (:mod:`.sampling`), stop handling, pipeline stages
exchanging activations point to point, and on GPUs CUDA graphs for the decode step.

Why not Megatron-Core 0.19's engines: ``StaticInferenceEngine`` now runs the
``DynamicInferenceEngine``, whose paged attention requires flash-attn >= 2.7.3 (asserted in
``Attention.forward``) and CUDA; its ``legacy=True`` path (``TextGenerationController``) runs on
the CPU only after patching CUDA-only calls (``torch.Generator(device=cuda)``, CUDA event
timing), is deprecated, prefills only up to the shortest prompt of a batch (the rest of longer
prompts go token by token), has no repetition penalty, shares one RNG per batch, and supports
CUDA graphs only with ``flash_decode`` (flash-attn again). Nothing here patches Megatron-Core.

Two cache layouts, both Megatron's static context:

- ``append`` (default): the context's ``sequence_len_offset`` grows by one per step, as Megatron
  uses it. Works for every attention Megatron's static context supports (MLA included).
- ``roll`` (CUDA graphs): the cache is a window of fixed width whose columns shift left by one
  before each step, so every decode step has the same shapes and offset and can be replayed as
  one CUDA graph. Only relative positions reach attention (RoPE keys are cached unrotated and
  rotated at read time; ALiBi and masks are relative), so shifting is exact; multi-latent
  attention caches rotated keys and uses ``append``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.attention import Attention
from megatron.core.utils import get_model_config

from megatron_patch.generation.sampling import SamplingParams, row_generators, select_tokens
from megatron_patch.generation.stopping import Completion, StopChecker

LAYOUTS = ("append", "roll")
_GRAPH_WIDTH_STEP = 64  # roll-layout cache widths are rounded up to this, so graphs get reused


def _last_token_logits(*, hidden_states: torch.Tensor, output_layer, output_weight,
                       scale_logits, **_) -> torch.Tensor:
    """GPTModel ``output_processor``: full-vocabulary logits of the last position only."""
    logits, _ = output_layer(hidden_states[-1:], weight=output_weight, runtime_gather_output=True)
    return scale_logits(logits)[0]


def attention_mask(valid: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """Megatron mask (True = masked) [batch, 1, length, offset + length] for queries in cache
    columns ``offset .. offset + length - 1``: causal over the valid (non-padding) columns.

    Every query may attend to itself, so padding queries never see an empty row (which gives
    NaN in some attention kernels and would spread through the cached values).
    """
    end = offset + length
    query = torch.arange(offset, end, device=valid.device)[:, None]
    key = torch.arange(end, device=valid.device)[None, :]
    allowed = (valid[:, None, :end] & (key <= query)) | (key == query)
    return ~allowed[:, None]


@dataclass
class _Batch:
    """Device state of one batch: cache, validity of its columns, next inputs."""

    context: StaticInferenceContext
    valid: torch.Tensor  # [batch, width] bool: cache column holds a real token
    tokens: torch.Tensor  # [batch, 1] next input token
    positions: torch.Tensor  # [batch, 1] its position in its sequence


class _DecodeGraph:
    """A CUDA graph of one roll-layout decode step (captured once per batch size and width)."""

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: allocations, lazy initialisation, compiled fusions
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread may query events while this thread captures.
        # Each graph gets its own memory pool: a pool shared with a freed graph is released with
        # it, and capturing into it again trips the caching allocator.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = step()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class Generator:
    """Generates for batches of token prompts on this rank's model chunk (one pipeline stage).

    Call :meth:`generate_batch` (or :func:`generate`) on every rank of the model-parallel group
    with the same prompts; every rank returns the same completions. ``layout`` is ``append`` or
    ``roll`` (see the module docstring); ``cuda_graphs`` replays roll-layout decode steps as CUDA
    graphs where possible (one GPU stage, no MoE, no MLA; a failed capture falls back to eager
    decoding with a warning) and then implies ``roll``.
    """

    def __init__(self, model: torch.nn.Module, *, vocab_rows: int, pad_id: int = 0,
                 layout: str = "append", cuda_graphs: bool = False,
                 check_every: int | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}; use one of {LAYOUTS}")
        self.model = model
        self.config = get_model_config(model)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.vocab_rows = vocab_rows
        self.pad_id = pad_id
        self.first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.attention = [m for m in model.modules() if isinstance(m, Attention)]
        mla = bool(getattr(self.config, "multi_latent_attention", False))
        self.cuda_graphs = (cuda_graphs and self.device.type == "cuda" and self.pp == 1 and not mla
                            and not self.config.num_moe_experts)
        self.layout = "roll" if self.cuda_graphs else layout
        if self.layout == "roll" and mla:
            raise ValueError("the roll cache layout needs unrotated cached keys; multi-latent "
                             "attention caches rotated ones (use layout='append')")
        # Host reads of the generated tokens (stop checks) wait for the device; on GPUs do them
        # every few steps so that the CPU runs ahead.
        self.check_every = check_every or (8 if self.device.type == "cuda" else 1)
        self._graphs: dict[tuple[int, int], tuple[_Batch, _DecodeGraph]] = {}
        self.graph_failure: str | None = None  # why the last capture failed, if one did

    # ----------------------------------------------------------------------------------------
    # one forward on this stage (pipeline stages pass activations point to point)

    def _forward(self, batch: _Batch, tokens: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor | None:
        """Logits [batch, vocab] on the last stage; None elsewhere."""
        size = (tokens.shape[1], tokens.shape[0], self.config.hidden_size)
        if not self.first:
            hidden = torch.empty(size, dtype=self.config.pipeline_dtype or self.dtype,
                                 device=self.device)
            torch.distributed.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        output = self.model(tokens, positions, mask, inference_context=batch.context,
                            output_processor=_last_token_logits)
        if not self.last:
            torch.distributed.send(output.contiguous(),
                                   parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return output

    def _share(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last stage's chosen tokens, on every pipeline stage."""
        if self.pp > 1:
            torch.distributed.broadcast(
                tokens, parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
        return tokens

    # ----------------------------------------------------------------------------------------
    # cache layouts

    def _new_batch(self, size: int, width: int) -> _Batch:
        context = StaticInferenceContext(size, width)
        for layer in self.attention:  # zeroed: masked columns must hold finite values
            shape = (width, size, layer.num_query_groups_per_partition)
            context.key_value_memory_dict[layer.layer_number] = (
                torch.zeros(*shape, layer.key_hidden_size, dtype=self.dtype, device=self.device),
                torch.zeros(*shape, layer.val_hidden_size, dtype=self.dtype, device=self.device))
        return _Batch(context, torch.zeros(size, width, dtype=torch.bool, device=self.device),
                      torch.full((size, 1), self.pad_id, dtype=torch.long, device=self.device),
                      torch.zeros(size, 1, dtype=torch.long, device=self.device))

    def _roll_step(self, batch: _Batch) -> torch.Tensor | None:
        """Shift the cache window left by one column, then run the next token at the last one."""
        for keys, values in batch.context.key_value_memory_dict.values():
            keys[:-1] = keys[1:].clone()
            values[:-1] = values[1:].clone()
        batch.valid[:, :-1] = batch.valid[:, 1:].clone()
        batch.valid[:, -1] = True
        batch.positions += 1
        width = batch.valid.shape[1]
        batch.context.sequence_len_offset = width - 1
        return self._forward(batch, batch.tokens, batch.positions,
                             ~batch.valid[:, None, None, :])

    def _append_step(self, batch: _Batch, offset: int) -> torch.Tensor | None:
        """Run the next token in cache column ``offset`` (the columns before it are filled)."""
        batch.valid[:, offset] = True
        batch.positions += 1
        batch.context.sequence_len_offset = offset
        return self._forward(batch, batch.tokens, batch.positions,
                             ~batch.valid[:, None, None, :offset + 1])

    def _batch_for(self, size: int, width: int) -> tuple[_Batch, _DecodeGraph | None]:
        """A fresh batch state, with its decode graph when CUDA graphs are on (reused)."""
        if not self.cuda_graphs:
            return self._new_batch(size, width), None
        key = (size, width)
        if key not in self._graphs:
            self._graphs.clear()  # one graph at a time: its cache is the batch's memory
            batch = self._new_batch(size, width)
            try:
                graph = _DecodeGraph(lambda: self._roll_step(batch))
            except RuntimeError as error:  # e.g. an operation that syncs with the host
                self.graph_failure = f"batch {size}, width {width}: {error}"
                warnings.warn(f"CUDA graph capture failed ({self.graph_failure}); decoding "
                              "eagerly", stacklevel=2)
                self.cuda_graphs = False
                return self._new_batch(size, width), None
            self._graphs[key] = (batch, graph)
        batch, graph = self._graphs[key]
        batch.valid.zero_()
        return batch, graph

    # ----------------------------------------------------------------------------------------

    def _prefill(self, batch: _Batch, prompts: Sequence[Sequence[int]], offset: int
                 ) -> torch.Tensor | None:
        """Run the left-padded prompts in cache columns ``offset ..``; logits of the last one."""
        length = max(map(len, prompts))
        pads = torch.tensor([length - len(p) for p in prompts], device=self.device)
        tokens = torch.tensor([[self.pad_id] * (length - len(p)) + list(p) for p in prompts],
                              dtype=torch.long, device=self.device)
        positions = (torch.arange(length, device=self.device)[None] - pads[:, None]).clamp(min=0)
        columns = torch.arange(length, device=self.device)[None]
        batch.valid[:, offset:offset + length] = columns >= pads[:, None]
        batch.positions.copy_(positions[:, -1:])
        batch.context.sequence_len_offset = offset
        return self._forward(batch, tokens, positions,
                             attention_mask(batch.valid, offset, length))

    def _steps(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
               params: SamplingParams, generators) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([batch] on the device), ``max(budgets)`` times."""
        size, length, steps = len(prompts), max(map(len, prompts)), max(budgets)
        width = length + steps - 1
        if self.layout == "roll":
            width = -(-width // _GRAPH_WIDTH_STEP) * _GRAPH_WIDTH_STEP
        batch, graph = self._batch_for(size, width)
        logits = self._prefill(batch, prompts, width - length if self.layout == "roll" else 0)
        seen = None
        if self.last and params.repetition_penalty != 1.0:
            seen = torch.zeros(size, self.vocab_rows, dtype=torch.bool, device=self.device)
            for row, prompt in enumerate(prompts):
                seen[row, torch.tensor(prompt, device=self.device)] = True
        for step in range(steps):
            tokens = torch.empty(size, dtype=torch.long, device=self.device)
            if self.last:
                tokens = select_tokens(logits[:, :self.vocab_rows], params, seen, generators)
            tokens = self._share(tokens)
            if seen is not None:
                seen[torch.arange(size, device=self.device), tokens] = True
            yield tokens
            if step == steps - 1:
                return
            batch.tokens.copy_(tokens[:, None])
            if graph is not None:
                logits = graph()
            elif self.layout == "roll":
                logits = self._roll_step(batch)
            else:
                logits = self._append_step(batch, length + step)

    def generate_batch(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                       params: SamplingParams, stop: StopChecker,
                       indices: Sequence[int] | None = None) -> list[Completion]:
        """Complete each prompt with at most ``budgets[i]`` new tokens.

        ``indices`` (the prompts' positions in the input) seed the per-row sampling generators.
        """
        if not prompts or min(budgets) < 1 or not all(prompts):
            raise ValueError("every prompt needs at least one token and a budget of one or more")
        indices = list(range(len(prompts))) if indices is None else list(indices)
        generators = None if params.is_greedy else row_generators(params.seed, indices,
                                                                 self.device)
        size = len(prompts)
        generated: list[list[int]] = [[] for _ in range(size)]
        lengths: list[int | None] = [None] * size  # set when a row stops on a token
        pending: list[torch.Tensor] = []
        with torch.no_grad():
            for step, tokens in enumerate(self._steps(prompts, budgets, params, generators)):
                pending.append(tokens)
                if (step + 1) % self.check_every and step + 1 < max(budgets):
                    continue
                for row, new in enumerate(torch.stack(pending, 1).tolist()):
                    if lengths[row] is not None or len(generated[row]) >= budgets[row]:
                        continue
                    checked = len(generated[row])
                    generated[row] += new[:budgets[row] - checked]
                    lengths[row] = stop.stop_length(generated[row], checked)
                pending = []
                if all(lengths[r] is not None or len(generated[r]) >= budgets[r]
                       for r in range(size)):
                    break
        return [stop.complete(tokens[:lengths[row]] if lengths[row] else tokens,
                              lengths[row] is not None)
                for row, tokens in enumerate(generated)]


def generate(generator: Generator, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             params: SamplingParams, stop: StopChecker, batch_size: int,
             max_seq_length: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[Completion]:
    """Complete every prompt (in order), ``batch_size`` at a time, prompts of similar length
    batched together. ``max_seq_length`` caps prompt + completion; ``progress(prompts, tokens)``
    is called after each batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = [prompts[i] for i in chosen]
        budgets = [max_new_tokens if max_seq_length is None
                   else min(max_new_tokens, max_seq_length - len(p)) for p in batch]
        done = generator.generate_batch(batch, budgets, params, stop, indices=chosen)
        for index, completion in zip(chosen, done):
            results[index] = completion
        if progress is not None:
            progress(len(chosen), sum(len(c.tokens) for c in done))
    return results


class Throughput:
    """Generated tokens per second since creation (wall clock)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> float:
        """Count ``tokens`` more; returns the rate so far."""
        self.tokens += tokens
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
