"""``megatron-patch verify --train-steps N``: does Megatron train like HF from the same weights?

Both sides start from the same weights, see the same batches in the same order and use AdamW
with the same hyper-parameters, weight-decay groups (none for biases and 1-D parameters, as
Megatron) and linear-warmup + cosine schedule to ``min_lr``. The Megatron side is the training
loop itself (:func:`setup_model_and_optimizer`, :func:`train_step`) at the given TP/PP/EP, data
parallel over the remaining ranks. The HF side is transformers' model with ``torch.optim.AdamW``,
``torch.nn.utils.clip_grad_norm_`` and transformers' ``get_cosine_with_min_lr_schedule_with_warmup``
(fp32, or fp32 weights under bf16 autocast, on rank 0), with dropout off and no frozen padding
row, as in Megatron. Per step we compare the loss (before the update) and the gradient norm
(before clipping).

A checkpoint whose vocabulary Megatron padded (``convert hf-to-mcore`` pads to a multiple of
128 x TP) trains with the padded rows in its softmax and gradient norm: the HF reference is
resized to the same vocabulary, its extra embedding (and untied output) rows copied from the
loaded Megatron model, so both sides train the same model.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_patch.conversion.verify.layers import verification_args
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.loop import (
    _configure_model_hooks,
    gpt_forward_step,
    setup_model_and_optimizer,
    train_step,
)
from megatron_patch.training.pretrain import set_padded_vocab

# Default relative tolerance on per-step loss and gradient norm, per precision. bf16 is a
# stated bound (Megatron keeps bf16 weights with fp32 master copies, HF fp32 weights under
# autocast), to be tightened from the 200-step GPU measurement.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


@dataclass(frozen=True)
class Hyper:
    """Optimizer and schedule shared by both sides."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass(frozen=True)
class TrainingCurves:
    """Per-step losses and gradient norms of both sides."""

    megatron_loss: list[float]
    hf_loss: list[float]
    megatron_grad_norm: list[float]
    hf_grad_norm: list[float]

    @staticmethod
    def _rel(a: list[float], b: list[float]) -> list[float]:
        return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]

    @property
    def loss_rel(self) -> list[float]:
        """|Megatron - HF| / |HF| loss per step."""
        return self._rel(self.megatron_loss, self.hf_loss)

    @property
    def grad_norm_rel(self) -> list[float]:
        """|Megatron - HF| / |HF| gradient norm per step."""
        return self._rel(self.megatron_grad_norm, self.hf_grad_norm)

    def ok(self, tolerance: float) -> bool:
        """Every step's loss and gradient norm within ``tolerance`` (NaN fails)."""
        return all(r <= tolerance for r in self.loss_rel + self.grad_norm_rel)

    def table(self, tolerance: float) -> str:
        """Per-step comparison and a verdict line."""
        lines = [f"{'step':>5} {'megatron loss':>14} {'hf loss':>12} {'rel':>9} "
                 f"{'megatron |g|':>13} {'hf |g|':>11} {'rel':>9}"]
        for i, (ml, hl, lr, mg, hg, gr) in enumerate(zip(
                self.megatron_loss, self.hf_loss, self.loss_rel, self.megatron_grad_norm,
                self.hf_grad_norm, self.grad_norm_rel)):
            flag = " *" if not (lr <= tolerance and gr <= tolerance) else ""
            lines.append(f"{i + 1:>5} {ml:14.6f} {hl:12.6f} {lr:9.2e} {mg:13.6f} {hg:11.6f} "
                         f"{gr:9.2e}{flag}")
        gap = max(abs(a - b) for a, b in zip(self.megatron_loss, self.hf_loss))
        lines.append(f"max loss gap {gap:.3e}, max relative: loss {max(self.loss_rel):.3e}, "
                     f"grad norm {max(self.grad_norm_rel):.3e} (tolerance {tolerance:g}): "
                     + ("OK" if self.ok(tolerance) else "FAILED"))
        return "\n".join(lines)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def training_batches(vocab: int, steps: int, global_batch: int, seq_length: int,
                     seed: int = 0) -> torch.Tensor:
    """``[steps, global_batch, seq_length + 1]`` token ids, the same on every rank.

    Drawn from a Zipf distribution (probability of id ``i`` proportional to ``1 / (i + 1)``),
    so there is something to learn and the loss curves fall.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    count = steps * global_batch * (seq_length + 1)
    ids = torch.multinomial(weights, count, replacement=True, generator=generator)
    return ids.view(steps, global_batch, seq_length + 1)


def _micro_batches(batches: torch.Tensor, rank: int, size: int) -> Iterator[dict]:
    """This data-parallel rank's share of every step's global batch, as GPTDataset dicts."""
    for batch in batches:
        rows = batch[rank * size:(rank + 1) * size]
        tokens = rows[:, :-1].contiguous()
        yield {"tokens": tokens, "labels": rows[:, 1:].contiguous(),
               "loss_mask": torch.ones(tokens.shape, dtype=torch.float),
               "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()}


# Megatron's vocabulary-sized parameters (any chunk wrapper prefix) -> kind of padded rows.
_VOCAB_PARAMETERS = {"embedding.word_embeddings.weight": "embedding",
                     "output_layer.weight": "output"}


def padded_rows(model: Sequence[torch.nn.Module], vocab: int,
                untied: bool) -> dict[str, torch.Tensor]:
    """Megatron's rows beyond the first ``vocab`` of the input embedding (and of the output
    layer when ``untied``), gathered from every TP shard and stage; empty without padding.

    Call on every rank; each rank gets the whole rows (fp32, CPU).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    mine = []
    for chunk in model:
        for name, param in chunk.named_parameters():
            kind = next((k for suffix, k in _VOCAB_PARAMETERS.items()
                         if name.endswith(suffix)), None)
            if kind is None or (kind == "output" and not untied):
                continue
            start = tp_rank * param.shape[0]  # vocabulary-parallel: TP shards of rows
            skip = max(0, vocab - start)
            if skip < param.shape[0]:
                mine.append((kind, start + skip, param.detach()[skip:].float().cpu()))
    gathered: list[list | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for kind, start, rows in (piece for part in gathered for piece in part):
        pieces.setdefault(kind, {})[start] = rows  # DP replicas give the same rows
    return {kind: torch.cat([rows[start] for start in sorted(rows)])
            for kind, rows in pieces.items()}


def _pad_vocabulary(model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> None:
    """Resize an HF model to Megatron's padded vocabulary, the new rows equal to ``rows``."""
    vocab = model.get_input_embeddings().weight.shape[0]
    untied = model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    if untied != ("output" in rows):
        raise ValueError("the HF model and the Megatron checkpoint disagree on tied embeddings")
    model.resize_token_embeddings(vocab + rows["embedding"].shape[0], mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = rows["embedding"]
        if untied:
            model.get_output_embeddings().weight[vocab:] = rows["output"]


def hf_training_curve(hf_dir: str | Path, batches: torch.Tensor, hyper: Hyper,
                      bf16: bool = False, padding: dict[str, torch.Tensor] | None = None,
                      adapter_dir: str | Path | None = None
                      ) -> tuple[list[float], list[float]]:
    """(losses, gradient norms) of ``len(batches)`` AdamW steps of the HF model.

    ``padding``: Megatron's padded vocabulary rows (:func:`padded_rows`) to train with.
    ``adapter_dir``: train this PEFT LoRA adapter on the frozen model instead (needs peft).
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        get_cosine_with_min_lr_schedule_with_warmup,
    )

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    # dropout off, as on the Megatron side (e.g. GPT-BigCode and OPT default to 0.1)
    config = AutoConfig.from_pretrained(hf_dir)
    no_dropout = {key: 0.0 for key, value in config.to_dict().items()
                  if isinstance(value, float) and ("dropout" in key or "pdrop" in key)}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **no_dropout)
    if padding:
        _pad_vocabulary(model, padding)
    model = model.to(device)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            # Megatron's embedding has no padding row: HF's padding_idx would freeze the
            # gradient of the pad token's row (OPT's pad id 1 is a frequent token here)
            module.padding_idx = None
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")],
               "weight_decay": hyper.weight_decay},
              {"params": [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")],
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=hyper.lr, betas=(hyper.beta1, hyper.beta2),
                                  eps=hyper.eps)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, hyper.warmup_steps, len(batches), min_lr=hyper.min_lr)
    losses, norms = [], []
    for batch in batches.to(device):
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 batch[:, 1:].flatten())
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                          hyper.clip_grad)))
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # room for Megatron's training on the same GPU
    return losses, norms


def megatron_training_curve(state, args, batches: torch.Tensor
                            ) -> tuple[list[float], list[float]]:
    """(losses, gradient norms) of Megatron's training loop (``state`` from
    :func:`setup_model_and_optimizer`) on ``batches``, on every rank."""
    _configure_model_hooks(state)
    for chunk in state.model:
        chunk.train()
    dp_rank = parallel_state.get_data_parallel_rank()
    iterators = [_micro_batches(batches, dp_rank, args.micro_batch_size)
                 for _ in state.model]
    losses, norms = [], []
    for _ in range(len(batches)):
        reported, ok, grad_norm = train_step(state, iterators, gpt_forward_step, args)
        if not ok:
            raise RuntimeError(f"Megatron skipped the update of step {len(losses) + 1}")
        # only the last pipeline stage has the loss
        loss = torch.tensor(reported.get("lm loss", -math.inf), device=_device())
        torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.MAX)
        losses.append(float(loss))
        norms.append(float(grad_norm))
    return losses, norms


def compare_training(hf_dir: str | Path, mcore_dir: str | Path, *, steps: int, tp: int = 1,
                     pp: int = 1, ep: int = 1, etp: int | None = None, batch_size: int = 2,
                     seq_length: int = 64,
                     hyper: Hyper = Hyper(), bf16: bool = False,
                     seed: int = 0, extra_args: Sequence[str] = (),
                     adapter_dir: str | Path | None = None) -> TrainingCurves:
    """Train ``steps`` steps on both sides; the curves are returned on every rank.

    ``extra_args`` are further Megatron flags (e.g. ``--sequence-parallel``, which Megatron
    requires for a mixture-of-experts model at TP > 1). With ``adapter_dir`` (a PEFT adapter)
    LoRA trains on both sides: ``mcore_dir`` is then the LoRA checkpoint of that adapter
    (``import-lora``), HF trains it with PEFT.
    """
    extra = ["--train-iters", str(steps), "--lr", str(hyper.lr), "--min-lr", str(hyper.min_lr),
             "--lr-decay-style", "cosine", "--lr-warmup-iters", str(hyper.warmup_steps),
             "--weight-decay", str(hyper.weight_decay), "--clip-grad", str(hyper.clip_grad),
             "--adam-beta1", str(hyper.beta1), "--adam-beta2", str(hyper.beta2),
             "--adam-eps", str(hyper.eps), "--optimizer", "adam", "--seed", str(seed),
             # HF's loss has no load-balancing term unless asked for router logits, and its
             # pooled form differs from Megatron's per-layer one: compare without it
             "--moe-aux-loss-coeff", "0",
             # nor does it update DeepSeek-V3's expert-selection bias (aux-loss-free balancing)
             "--moe-router-bias-update-rate", "0",
             *(["--bf16"] if bf16 else []), *extra_args]
    args = verification_args(hf_dir, mcore_dir, tp=tp, pp=pp, ep=ep, etp=etp,
                             batch_size=batch_size, seq_length=seq_length, extra=extra)
    initialize(args)
    try:
        set_padded_vocab(args, None)
        vocab = int(load_hf_config(hf_dir)["vocab_size"])
        batches = training_batches(vocab, steps, args.global_batch_size, seq_length, seed)
        # Megatron first: the HF reference takes its padded vocabulary rows (both models are
        # in memory while HF trains on rank 0)
        state = setup_model_and_optimizer(args)
        padding = padded_rows(state.model, vocab, args.untie_embeddings_and_output_weights)
        reference = torch.zeros(2, steps, dtype=torch.float64)
        if torch.distributed.get_rank() == 0:
            reference = torch.tensor(hf_training_curve(hf_dir, batches, hyper, bf16, padding,
                                                       adapter_dir), dtype=torch.float64)
        mine = megatron_training_curve(state, args, batches)
        reference = reference.to(_device())
        torch.distributed.broadcast(reference, src=0)
        hf_loss, hf_norm = reference.tolist()
        return TrainingCurves(mine[0], hf_loss, mine[1], hf_norm)
    finally:
        teardown_parallel_state()
