"""``megatron-patch verify --layers``: where do HF and Megatron activations part ways?

The HF model and the Megatron checkpoint run on the same tokens with hooks on every decoder
layer's input, its attention output and its MLP output (before the residual add; bias added
back on the Megatron side, the residual taken off on the HF side where the HF block adds it
itself, as Bloom's does), on the final norm's output and on the logits. The HF activations are
computed on rank 0 and broadcast; every Megatron rank compares the points it holds (sequence
parallel activations are gathered over the tensor-parallel group first) and the per-point
errors are gathered on rank 0, so any TP/PP/EP layout gives one table.
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import tensor_parallel
from megatron.core.utils import get_model_config

from megatron_patch.conversion.layout import parse_megatron_args
from megatron_patch.conversion.verify.logits import (
    forward_logits,
    load_megatron_model,
    random_tokens,
)
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.pretrain import set_padded_vocab

POINTS = ("input", "attention", "mlp")
_HF_ATTENTION = ("self_attn", "self_attention", "attn")
_HF_MLP = ("mlp", "block_sparse_moe")
_HF_FINAL_NORM = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass(frozen=True)
class PointError:
    """Error of one activation: ``layer`` is None for the final norm and the logits."""

    layer: int | None
    point: str
    max_abs: float
    rel: float  # max_abs / max |HF value|

    def over(self, tolerance: float) -> bool:
        """Whether the relative error exceeds ``tolerance`` (NaN counts as over)."""
        return not self.rel <= tolerance


def _key(layer: int | None, point: str) -> str:
    return point if layer is None else f"{layer}.{point}"


def verification_args(hf_dir: str | Path, mcore_dir: str | Path, *, tp: int, pp: int,
                      ep: int = 1, etp: int | None = None, batch_size: int, seq_length: int,
                      extra: Sequence[str] = ()) -> argparse.Namespace:
    """Megatron arguments loading ``mcore_dir`` at TP/PP/EP/ETP, dropout off (no logging)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel = max(1, world // (tp * pp))
    experts = ["--expert-tensor-parallel-size", str(etp)] if etp else []
    return parse_megatron_args([
        "--load", str(mcore_dir), "--hf-config-path", str(hf_dir),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--expert-model-parallel-size", str(ep), *experts,
        "--micro-batch-size", str(batch_size),
        "--global-batch-size", str(batch_size * data_parallel),
        "--seq-length", str(seq_length), "--finetune", "--no-load-optim", "--no-load-rng",
        "--attention-dropout", "0", "--hidden-dropout", "0", *extra,
    ])


# ---------------------------------------------------------------- HF side (rank 0)

def _first_child(module: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module | None:
    return next((getattr(module, n) for n in names if hasattr(module, n)), None)


def _hf_modules(model, num_layers: int):
    """(decoder layers, final norm) of an HF causal LM, found by structure."""
    base = model.base_model
    layers = next((m for m in base.modules()
                   if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers), None)
    inside = {id(m) for m in layers.modules()} if layers is not None else set()
    norms = [m for name, m in base.named_modules()
             if name.rsplit(".", 1)[-1] in _HF_FINAL_NORM and id(m) not in inside]
    if layers is None or len(norms) != 1:
        raise ValueError(f"cannot find the decoder layers / final norm of {type(model).__name__}")
    return layers, norms[0]


def _block_hook(store: dict, key: str, module: torch.nn.Module) -> Callable:
    """Forward hook storing a block's output, less its ``residual`` argument if it takes one."""
    names = list(inspect.signature(module.forward).parameters)

    def hook(mod, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        if "residual" in names:  # Bloom's blocks add the residual themselves
            residual = kwargs.get("residual")
            out = out - (args[names.index("residual")] if residual is None else residual)
        store[key] = out.detach().float().clone()

    return hook


def hf_activations(hf_dir: str | Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF fp32 activations ``[points, batch, seq, hidden]`` (order of :func:`point_keys`) and
    the logits, on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    layers, final_norm = _hf_modules(model, num_layers)
    store: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            store[_key(i, "input")] = hidden.detach().float().clone()
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        for point, names in (("attention", _HF_ATTENTION), ("mlp", _HF_MLP)):
            block = _first_child(layer, names)
            if block is None:
                raise ValueError(f"HF layer {i} has none of {names}")
            handles.append(block.register_forward_hook(_block_hook(store, _key(i, point), block),
                                                       with_kwargs=True))
    handles.append(final_norm.register_forward_hook(
        lambda mod, args, out: store.__setitem__("final_norm", out.detach().float().clone())))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    for handle in handles:
        handle.remove()
    stacked = torch.stack([store[key] for key in point_keys(num_layers)])
    return stacked, logits


def point_keys(num_layers: int) -> list[str]:
    """Names of the compared activations, layer by layer, then the final norm."""
    return [_key(i, p) for i in range(num_layers) for p in POINTS] + ["final_norm"]


# ---------------------------------------------------------------- Megatron side (every rank)

def _to_bsh(tensor: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Megatron ``[seq, batch, hidden]`` (sequence-split under SP) -> full ``[batch, seq, h]``."""
    if sequence_parallel:
        tensor = tensor_parallel.gather_from_sequence_parallel_region(
            tensor, tensor_model_parallel_output_grad=False)
    return tensor.detach().float().clone().transpose(0, 1)  # bda may add in place


def _megatron_hooks(model: list[torch.nn.Module], store: dict) -> list:
    """Hooks recording this rank's layer inputs, attention/MLP outputs and final norm."""
    sp = get_model_config(model[0]).sequence_parallel

    def record(key: str) -> Callable:
        def hook(mod, args, output):
            out, bias = output if isinstance(output, tuple) else (output, None)
            store[key] = _to_bsh(out if bias is None else out + bias, sp)
        return hook

    def record_input(key: str) -> Callable:
        def hook(mod, args, kwargs):
            store[key] = _to_bsh(kwargs.get("hidden_states", args[0] if args else None), sp)
        return hook

    handles = []
    for chunk in model:
        decoder = (chunk.module if hasattr(chunk, "module") else chunk).decoder
        for layer in decoder.layers:
            index = layer.layer_number - 1  # global, 1-based in Megatron
            handles += [
                layer.register_forward_pre_hook(record_input(_key(index, "input")),
                                                with_kwargs=True),
                layer.self_attention.register_forward_hook(record(_key(index, "attention"))),
                layer.mlp.register_forward_hook(record(_key(index, "mlp"))),
            ]
        if getattr(decoder, "final_layernorm", None) is not None:
            handles.append(decoder.final_layernorm.register_forward_hook(record("final_norm")))
    return handles


def _error(layer: int | None, point: str, mine: torch.Tensor,
           reference: torch.Tensor) -> PointError:
    diff = float((mine - reference).abs().max())
    scale = float(reference.abs().max())
    return PointError(layer, point, diff, diff / scale if scale > 0 else diff)


def _parse_key(key: str) -> tuple[int | None, str]:
    layer, _, point = key.rpartition(".")
    return (int(layer) if layer else None), point


def compare_layers(hf_dir: str | Path, mcore_dir: str | Path, *, tp: int = 1, pp: int = 1,
                   ep: int = 1, etp: int | None = None, batch_size: int = 2,
                   seq_length: int = 64, seed: int = 0) -> list[PointError]:
    """Per-layer, per-point errors of the Megatron checkpoint against HF (same on every rank).

    Sets up and tears down Megatron's parallel state, like :func:`compare_logits`.
    """
    args = verification_args(hf_dir, mcore_dir, tp=tp, pp=pp, ep=ep, etp=etp,
                             batch_size=batch_size, seq_length=seq_length)
    initialize(args)
    try:
        set_padded_vocab(args, None)
        hf_config = load_hf_config(hf_dir)
        vocab = int(hf_config["vocab_size"])
        tokens = random_tokens(vocab, batch_size, seq_length, seed)
        keys = point_keys(args.num_layers)
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        reference = torch.empty(len(keys), batch_size, seq_length, args.hidden_size)
        reference_logits = torch.empty(batch_size, seq_length, vocab)
        if torch.distributed.get_rank() == 0:
            reference, reference_logits = hf_activations(hf_dir, tokens)
        reference, reference_logits = reference.to(device), reference_logits.to(device)
        torch.distributed.broadcast(reference, src=0)
        torch.distributed.broadcast(reference_logits, src=0)

        model = load_megatron_model(args)
        store: dict[str, torch.Tensor] = {}
        handles = _megatron_hooks(model, store)
        logits = forward_logits(model, tokens)
        for handle in handles:
            handle.remove()
        local = [_error(*_parse_key(key), store[key], reference[keys.index(key)])
                 for key in keys if key in store]
        if logits is not None:
            local.append(_error(None, "logits", logits[..., :vocab], reference_logits))
        gathered: list[list[PointError]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, local)
        found = {(e.layer, e.point): e for errors in gathered for e in errors}
        order = [_parse_key(k) for k in keys] + [(None, "logits")]
        missing = [o for o in order if o not in found]
        if missing:
            raise RuntimeError(f"no Megatron activation recorded for {missing}")
        return [found[o] for o in order]
    finally:
        teardown_parallel_state()


def first_over(errors: Sequence[PointError], tolerance: float) -> PointError | None:
    """The first point (in forward order) whose relative error exceeds ``tolerance``."""
    return next((e for e in errors if e.over(tolerance)), None)


def format_table(errors: Sequence[PointError], tolerance: float) -> str:
    """The per-layer error table with the first point over ``tolerance`` marked."""
    first = first_over(errors, tolerance)
    lines = [f"{'layer':>6}  {'point':<10} {'max abs':>10} {'relative':>10}"]
    for e in errors:
        mark = "  <- first over tolerance" if e is first else (" *" if e.over(tolerance) else "")
        layer = "-" if e.layer is None else str(e.layer)
        lines.append(f"{layer:>6}  {e.point:<10} {e.max_abs:10.3e} {e.rel:10.3e}{mark}")
    if first is None:
        lines.append(f"all points within relative tolerance {tolerance:g}")
    else:
        where = "final" if first.layer is None else f"layer {first.layer}"
        lines.append(f"first over relative tolerance {tolerance:g}: {where} {first.point} "
                     f"(relative {first.rel:.3e})")
    return "\n".join(lines)
