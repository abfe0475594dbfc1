"""Per-GPU memory of a Megatron-Core training layout: parameters, gradients, optimizer states,
activations.

Parameters are counted from the Megatron argument values (``num_layers``, ``ffn_hidden_size``,
experts, ...), sharded the way Megatron-Core shards them: tensor parallelism splits the attention
and MLP matrices and the vocabulary, pipeline parallelism splits the layers uniformly (the first
stage holds the embedding, the last the final norm and output layer), expert parallelism splits
the experts and expert tensor parallelism each expert's matrices.

Bytes per parameter follow Megatron's mixed-precision Adam: 16-bit weights, fp32 gradient buffer
(bf16; fp16 reduces in fp16), fp32 master weights and two fp32 moments: 2 + 4 + 12 = 18 bytes, or
2 + 4 + 12/d with the distributed optimizer over d data-parallel ranks (fp32 training: 4 + 4 + 8).

Activations follow Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (2022), term by term: for a GPT layer (4h GeLU MLP, multi-head attention, dropout) the
stored tensors add up to ``s*b*h*(34 + 5*a*s/h)`` bytes, ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``
with tensor parallelism, ``s*b*h/t*(34 + 5*a*s/h)`` with sequence parallelism, and the
``5*a*s/h`` attention-score term disappears with selective recompute or flash attention. The
same terms are written for gated MLPs, grouped-query attention, routed and shared experts
(balanced routing) and no dropout. Context parallelism divides the sequence. Full recompute
keeps each layer's input plus one layer's working set. The first pipeline stage holds the most
micro-batches in flight (1F1B: PP; interleaved: PP*(1 + (PP-1)/(PP*VPP)) stages' worth); the
last stage adds the logits and the cross-entropy's fp32 softmax for one micro-batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from megatron_patch.models.vocab import padded_vocab_size
from megatron_patch.parallel_layout import ParallelLayout

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the estimate needs (Megatron argument semantics)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int  # unpadded rows; padded per TP like Megatron
    gated: bool = True
    qkv_bias: bool = False
    linear_bias: bool = False
    qk_norm: bool = False
    tied: bool = False
    layernorm: bool = False  # LayerNorm (weight and bias) instead of RMSNorm
    learned_positions: int = 0  # rows of a learned absolute position embedding
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    experts: int = 0
    topk: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0
    shared_gate: bool = False
    moe_pattern: tuple[int, ...] = ()  # 1 for each layer with routed experts
    mla: dict[str, int] = field(default_factory=dict)  # q_lora_rank, kv_lora_rank, dims
    divisible_by: int = 128
    layer_norms: int = 2  # norms per layer: input and pre-MLP (GLM-4: 4; Falcon-7B: 1)
    embedding_norm: bool = False  # a norm on the word embeddings (Bloom)

    @classmethod
    def from_megatron_args(cls, args: dict[str, Any]) -> Shape:
        """From Megatron argument values; missing ones take Megatron's parser defaults."""
        from megatron_patch.launch.flags import megatron_defaults

        a = {**megatron_defaults(), **args}
        heads = a["num_attention_heads"]
        experts = a.get("num_experts") or 0
        mla = {}
        if a.get("multi_latent_attention"):
            mla = {key: a[key] or 0 for key in ("q_lora_rank", "kv_lora_rank", "qk_head_dim",
                                                "qk_pos_emb_head_dim", "v_head_dim")}
        return cls(
            layers=a["num_layers"], hidden=a["hidden_size"],
            ffn=a["ffn_hidden_size"] or 4 * a["hidden_size"], heads=heads,
            groups=a["num_query_groups"] if a["group_query_attention"] else heads,
            head_dim=a["kv_channels"] or a["hidden_size"] // heads, vocab=a["vocab_size"],
            gated=bool(a["swiglu"]), qkv_bias=bool(a["add_qkv_bias"]),
            linear_bias=bool(a["add_bias_linear"]), qk_norm=bool(a["qk_layernorm"]),
            tied=not a["untie_embeddings_and_output_weights"],
            layernorm=a["normalization"] == "LayerNorm",
            learned_positions=a["max_position_embeddings"] + a.get("position_id_offset", 0)
            if a["position_embedding_type"] == "learned_absolute" else 0,
            attention_dropout=a["attention_dropout"], hidden_dropout=a["hidden_dropout"],
            experts=experts, topk=a["moe_router_topk"] if experts else 0,
            moe_ffn=(a["moe_ffn_hidden_size"] or a["ffn_hidden_size"]) if experts else 0,
            shared_ffn=a.get("moe_shared_expert_intermediate_size") or 0,
            shared_gate=bool(a.get("moe_shared_expert_gate")),
            moe_pattern=_moe_pattern(a["moe_layer_freq"], a["num_layers"]) if experts else (),
            mla=mla, divisible_by=a["make_vocab_size_divisible_by"],
            layer_norms=(1 if a.get("parallel_attention_mlp")
                         and a.get("parallel_attention_norms", 1) == 1 else 2)
            + 2 * bool(a.get("post_sublayer_norms")),
            embedding_norm=bool(a.get("embedding_layernorm")),
        )

    def layout_args(self) -> dict[str, Any]:
        """The Megatron argument values :meth:`ParallelLayout.problems` reads."""
        return {"num_layers": self.layers, "num_attention_heads": self.heads,
                "group_query_attention": True, "num_query_groups": self.groups,
                "kv_channels": self.head_dim, "ffn_hidden_size": self.ffn,
                "num_experts": self.experts, "moe_ffn_hidden_size": self.moe_ffn}

    def padded_vocab(self, tp: int) -> int:
        """Embedding rows at tensor-parallel size ``tp`` (Megatron's padding)."""
        return padded_vocab_size(self.vocab, self.divisible_by, tp)


def _moe_pattern(freq: int | list[int], layers: int) -> tuple[int, ...]:
    """Megatron's moe_layer_freq: every N-th layer (from the first) or an explicit pattern."""
    if isinstance(freq, int):
        return tuple(int(i % freq == 0) for i in range(layers))
    return tuple(freq)


@dataclass(frozen=True)
class Layout:
    """A parallel layout and its training settings."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int | None = None  # None: TP
    sp: bool = False
    distributed_optimizer: bool = False
    offload_fraction: float = 0.0
    micro_batch: int = 1
    global_batch: int = 1  # sequences per optimizer step
    seq: int = 4096
    recompute: str = "none"  # none | sel | full
    precision: str = "bf16"  # bf16 | fp16 | fp8 | fp32
    flash_attention: bool = True

    @functools.cached_property
    def parallel(self) -> ParallelLayout:
        """Its sizes as the one :class:`ParallelLayout`, which derives the sizes below."""
        return ParallelLayout.of_replicas(
            self.dp, tp=self.tp, pp=self.pp, vpp=self.vpp if self.vpp > 1 else None, cp=self.cp,
            ep=self.ep, etp=self.etp, sp=self.sp, micro_batch=self.micro_batch,
            global_batch=self.global_batch, seq=self.seq)

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size."""
        return self.parallel.expert_tp

    @property
    def world(self) -> int:
        """GPUs of the layout."""
        return self.parallel.world

    @property
    def microbatches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (at least one)."""
        return max(1, self.parallel.microbatches)


# ---------------------------------------------------------------------------- parameters


def _norm(shape: Shape, width: int) -> int:
    return width * (2 if shape.layernorm else 1)


def attention_params(shape: Shape, tp: int = 1) -> int:
    """Parameters of one attention block (with its input norm) on one TP rank."""
    h, a = shape.hidden, shape.heads
    if shape.mla:
        m = shape.mla
        qk = m["qk_head_dim"] + m["qk_pos_emb_head_dim"]
        if m["q_lora_rank"]:
            replicated = h * m["q_lora_rank"] + _norm(shape, m["q_lora_rank"])
            sharded = m["q_lora_rank"] * a * qk
        else:
            replicated, sharded = 0, h * a * qk
        replicated += h * (m["kv_lora_rank"] + m["qk_pos_emb_head_dim"])
        replicated += _norm(shape, m["kv_lora_rank"])
        sharded += m["kv_lora_rank"] * a * (m["qk_head_dim"] + m["v_head_dim"])
        sharded += a * m["v_head_dim"] * h
        return replicated + sharded // tp + _norm(shape, h) + h * shape.linear_bias
    d, g = shape.head_dim, shape.groups
    qkv = a * d + 2 * g * d
    sharded = h * qkv + a * d * h + qkv * (shape.qkv_bias or shape.linear_bias)
    replicated = _norm(shape, h) + h * shape.linear_bias + 2 * _norm(shape, d) * shape.qk_norm
    return sharded // tp + replicated


def _mlp(shape: Shape, ffn: int) -> tuple[int, int]:
    """(parameters split by TP, replicated bias) of one MLP of width ``ffn``."""
    h, up = shape.hidden, ffn * (2 if shape.gated else 1)
    return h * up + ffn * h + up * shape.linear_bias, h * shape.linear_bias


def mlp_params(shape: Shape, moe: bool, tp: int = 1, ep: int = 1, etp: int = 1) -> int:
    """Parameters of one MLP block (with its pre-MLP norm) on one rank."""
    norm = _norm(shape, shape.hidden)
    if not moe:
        sharded, bias = _mlp(shape, shape.ffn)
        return sharded // tp + bias + norm
    expert_sharded, expert_bias = _mlp(shape, shape.moe_ffn)
    experts = shape.experts // ep * (expert_sharded // etp + expert_bias)
    router = shape.experts * shape.hidden
    shared = 0
    if shape.shared_ffn:
        sharded, bias = _mlp(shape, shape.shared_ffn)
        shared = sharded // tp + bias + shape.hidden * shape.shared_gate
    return experts + router + shared + norm


@dataclass(frozen=True)
class StageParams:
    """Parameters one GPU holds, split into dense (DP-replicated) and expert ones."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        """All parameters on the GPU."""
        return self.dense + self.expert


def _is_moe_layer(shape: Shape, index: int) -> bool:
    return bool(shape.moe_pattern) and bool(shape.moe_pattern[index])


def stage_params(shape: Shape, layout: Layout, stage: int) -> StageParams:
    """Parameters on one GPU of pipeline ``stage`` (0-based) for ``layout``."""
    tp, pp = layout.tp, layout.pp
    per_stage = shape.layers // pp
    dense = expert = 0
    for index in range(stage * per_stage, (stage + 1) * per_stage):
        moe = _is_moe_layer(shape, index)
        dense += attention_params(shape, tp)
        block = mlp_params(shape, moe, tp, layout.ep, layout.expert_tp)
        if moe:
            routed, bias = _mlp(shape, shape.moe_ffn)
            routed = shape.experts // layout.ep * (routed // layout.expert_tp + bias)
            expert += routed
            dense += block - routed
        else:
            dense += block
    dense += (shape.layer_norms - 2) * _norm(shape, shape.hidden) * per_stage
    vocab = shape.padded_vocab(tp) * shape.hidden // tp
    if stage == 0:
        dense += vocab + shape.learned_positions * shape.hidden
        dense += _norm(shape, shape.hidden) * shape.embedding_norm
    if stage == pp - 1:
        dense += _norm(shape, shape.hidden)
        if not shape.tied or pp > 1:  # tied embeddings keep a copy on the last stage
            dense += vocab
    return StageParams(dense, expert)


def total_params(shape: Shape) -> int:
    """All parameters of the model (TP=PP=EP=1, padded vocabulary)."""
    return stage_params(shape, Layout(), 0).total


# ---------------------------------------------------------------------------- bytes


def _bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weight, gradient buffer, optimizer state) bytes per parameter for Adam."""
    return {"bf16": (2, 4, 12), "fp8": (2, 4, 12), "fp16": (2, 2, 12),
            "fp32": (4, 4, 8)}[precision]


@dataclass(frozen=True)
class Memory:
    """Estimated bytes on the busiest GPU of a layout."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    params: int  # parameters on that GPU

    @property
    def total(self) -> float:
        """Everything."""
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.overhead)

    def gib(self) -> dict[str, float]:
        """Each part in GiB."""
        return {name: getattr(self, name) / GIB for name in
                ("weights", "gradients", "optimizer", "activations", "logits", "overhead",
                 "total")}


def state_bytes(params: StageParams, layout: Layout) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes for the parameters of one GPU."""
    weight, grad, state = _bytes_per_param(layout.precision)
    optimizer = float(params.total * state)
    if layout.distributed_optimizer:
        expert_dp = max(1, layout.parallel.expert_dp)
        optimizer = params.dense * state / (layout.dp * layout.cp) \
            + params.expert * state / expert_dp
    return (float(params.total * weight), float(params.total * grad),
            optimizer * (1.0 - layout.offload_fraction))


def layer_activation_bytes(shape: Shape, layout: Layout, moe: bool = False) -> float:
    """Bytes one layer stores for the backward pass of one micro-batch (no recompute)."""
    s, b, h = layout.seq / layout.cp, layout.micro_batch, shape.hidden
    t = layout.tp
    sp = t if layout.sp else 1  # what sequence parallelism divides
    a, d, g = shape.heads, shape.head_dim, shape.groups
    dropout = 1 if shape.hidden_dropout > 0 else 0
    # Norm inputs, the QKV input and the MLP input: replicated over TP unless SP.
    stored = s * b * h * (2 + 2 + 2 + (0 if moe else 2) + 2 * dropout) / sp
    if shape.mla:
        # Latent down-projections (replicated), then Q, K, V and the output projection input.
        m = shape.mla
        qk = a * (m["qk_head_dim"] + m["qk_pos_emb_head_dim"])
        stored += 2 * s * b * (m["q_lora_rank"] + m["kv_lora_rank"] + m["qk_pos_emb_head_dim"])
        stored += 2 * s * b * (2 * qk + 2 * a * m["v_head_dim"]) / t
    else:
        # Q, K, V (inputs of QK^T and of the attention over V) and the output projection input.
        # With fewer key/value heads than TP ranks Megatron all-gathers the fused QKV output and
        # a rank's Q, K, V are views of it, which keep it whole.
        qkv = (a + 2 * g) * d / (t if g >= t else 1)
        stored += 2 * s * b * (qkv + a * d / t)
    if not layout.flash_attention and layout.recompute == "none":
        # Softmax output, and with attention dropout its mask and output.
        scores = 2 + (3 if shape.attention_dropout > 0 else 0)
        stored += scores * a * s * s * b / t
    if not moe:
        up = shape.ffn * (2 if shape.gated else 1)
        return stored + 2 * s * b * (up + shape.ffn) / t
    # Routed experts, balanced routing: each token reaches topk experts; ETP gathers the tokens
    # of its group and splits each expert's width. Router logits are fp32.
    tokens = s * b / sp
    up = shape.moe_ffn * (2 if shape.gated else 1)
    etp = layout.expert_tp
    stored += tokens * (2 * h + 4 * shape.experts)
    stored += tokens * shape.topk * (2 * h * etp + 2 * (up + shape.moe_ffn))
    if shape.shared_ffn:
        up = shape.shared_ffn * (2 if shape.gated else 1)
        stored += 2 * s * b * (up + shape.shared_ffn) / t
    return stored


def _in_flight(layout: Layout, stage: int) -> float:
    """Layers' worth of micro-batches whose activations pipeline ``stage`` holds at peak."""
    pp, vpp, m = layout.pp, layout.vpp, layout.microbatches
    if vpp == 1:
        return min(m, pp - stage)
    chunks = min(m * vpp, (pp - stage - 1) * 2 + (vpp - 1) * pp + 1)
    return chunks / vpp


def activation_bytes(shape: Shape, layout: Layout, stage: int) -> float:
    """Activations pipeline ``stage`` holds at its peak."""
    per_stage = shape.layers // layout.pp
    indices = range(stage * per_stage, (stage + 1) * per_stage)
    full = [layer_activation_bytes(shape, layout, _is_moe_layer(shape, i)) for i in indices]
    if layout.recompute == "full":  # each layer's input, plus one layer being recomputed
        sp = layout.tp if layout.sp else 1
        inputs = 2 * layout.seq / layout.cp * layout.micro_batch * shape.hidden / sp
        return inputs * per_stage * _in_flight(layout, stage) + max(full)
    return sum(full) * _in_flight(layout, stage)


def logits_bytes(shape: Shape, layout: Layout) -> float:
    """Last stage, one micro-batch: 16-bit logits, their fp32 copy and the saved softmax."""
    tokens = layout.seq / layout.cp * layout.micro_batch
    return tokens * shape.padded_vocab(layout.tp) / layout.tp * (2 + 4 + 4)


def estimate(shape: Shape, layout: Layout, overhead_gib: float = 3.0) -> Memory:
    """Memory of the busiest GPU: the first or the last pipeline stage."""
    best = None
    for stage in sorted({0, layout.pp - 1}):
        params = stage_params(shape, layout, stage)
        weights, grads, optimizer = state_bytes(params, layout)
        logits = logits_bytes(shape, layout) if stage == layout.pp - 1 else 0.0
        memory = Memory(weights, grads, optimizer, activation_bytes(shape, layout, stage),
                        logits, overhead_gib * GIB, params.total)
        if best is None or memory.total > best.total:
            best = memory
    return best


def bubble_fraction(layout: Layout) -> float:
    """Pipeline bubble of (interleaved) 1F1B: (PP-1) / (VPP*M + PP-1)."""
    return (layout.pp - 1) / (layout.vpp * layout.microbatches + layout.pp - 1)

