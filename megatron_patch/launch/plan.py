"""``megatron-patch plan``: propose a parallel layout that fits the GPUs, from the memory model.

    megatron-patch plan --model qwen2.5-7b --gpus 8 --seq 4096 [--gpu-mem 80] [--gbs 64]

Every layout of TP (within a node), PP, VPP, EP (MoE), micro-batch size and recompute (none,
selective, full) that :class:`~megatron_patch.parallel_layout.ParallelLayout` finds no problem
with for the model (TP dividing the attention heads and sharing out the key/value heads, PP
dividing the layers, EP the experts, the batch splitting over the data-parallel ranks, ...) is
estimated with :mod:`megatron_patch.launch.memory`; among those that fit ``--gpu-mem`` the one
with the best relative throughput is proposed. Throughput is a documented heuristic, not a
measurement: pipeline bubble ``(PP-1)/(VPP*M+PP-1)``, full recompute costs an extra forward pass
(x0.75), selective x0.97, each doubling of TP x0.96, of EP x0.97, and micro-batches under 8192
tokens lose up to 15%. The memory model covers context parallelism, but ``plan`` does not search
CP (it proposes CP=1; without Transformer Engine CP gathers whole-sequence keys/values).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_patch.launch.memory import GIB, Layout, Memory, Shape, bubble_fraction, estimate
from megatron_patch.parallel_layout import ParallelLayout

RECOMPUTE_COST = {"none": 1.0, "sel": 0.97, "full": 0.75}


@dataclass(frozen=True)
class Candidate:
    """A layout, its memory estimate and relative throughput score."""

    layout: Layout
    memory: Memory
    score: float


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(max(1, limit))) + 1)]


def score(layout: Layout) -> float:
    """Relative throughput of a layout (higher is faster); see the module docstring."""
    tokens = layout.micro_batch * layout.seq / layout.cp
    size = min(1.0, 0.85 + 0.05 * math.log2(max(tokens, 1024) / 1024))
    return ((1 - bubble_fraction(layout)) * RECOMPUTE_COST[layout.recompute] * size
            * 0.96 ** math.log2(layout.tp) * 0.97 ** math.log2(layout.ep))


def candidates(shape: Shape, gpus: int, seq: int, global_batch: int, *, gpu_mem_gib: float,
               gpus_per_node: int = 8, precision: str = "bf16", max_micro_batch: int = 8,
               overhead_gib: float = 3.0, fixed: dict | None = None) -> list[Candidate]:
    """Every valid layout that fits, best first. ``fixed`` pins fields of :class:`Layout`
    (``tp``, ``pp``, ``vpp``, ``ep``, ``micro_batch``, ``recompute``)."""
    fixed = fixed or {}

    def allowed(field: str, values: Sequence) -> list:
        return [v for v in values if fixed.get(field, v) == v]

    model = shape.layout_args()
    found = []
    for tp, pp, vpp, ep, mbs in itertools.product(
            allowed("tp", _divisors(min(gpus, gpus_per_node))), allowed("pp", _divisors(gpus)),
            allowed("vpp", [1, 2]), allowed("ep", _divisors(gpus) if shape.experts else [1]),
            allowed("micro_batch", _powers_of_two(max_micro_batch))):
        sizes = ParallelLayout(tp=tp, pp=pp, vpp=vpp if vpp > 1 else None, ep=ep,
                               etp=1 if ep > 1 else None, sp=tp > 1, world=gpus,
                               micro_batch=mbs, global_batch=global_batch, seq=seq)
        if sizes.problems(model):
            continue
        for recompute in allowed("recompute", list(RECOMPUTE_COST)):
            layout = Layout(
                tp=tp, pp=pp, vpp=vpp, dp=sizes.dp, ep=ep, etp=sizes.etp, sp=sizes.sp,
                distributed_optimizer=sizes.dp > 1, micro_batch=mbs, global_batch=global_batch,
                seq=seq, recompute=recompute, precision=precision)
            memory = estimate(shape, layout, overhead_gib)
            if memory.total <= gpu_mem_gib * GIB:
                found.append(Candidate(layout, memory, score(layout)))
    unique = {c.layout: c for c in found}
    return sorted(unique.values(), key=lambda c: (-c.score, c.memory.total))


def describe(layout: Layout) -> str:
    """``TP=2 PP=1 ...`` for one layout."""
    parts = [f"TP={layout.tp}", f"PP={layout.pp}"]
    parts += [f"VPP={layout.vpp}"] * (layout.vpp > 1)
    parts += [f"CP={layout.cp}"] * (layout.cp > 1)
    parts += [f"EP={layout.ep}"] * (layout.ep > 1)
    parts += [f"DP={layout.dp}", f"MBS={layout.micro_batch}", f"recompute={layout.recompute}",
              f"SP={str(layout.sp).lower()}", f"DO={str(layout.distributed_optimizer).lower()}"]
    return " ".join(parts)


def memory_line(memory: Memory, gpu_mem_gib: float) -> str:
    """``61.3 GiB of 80 (weights ..., ...)``."""
    parts = memory.gib()
    detail = ", ".join(f"{name} {parts[name]:.1f}" for name in
                       ("weights", "gradients", "optimizer", "activations", "logits", "overhead"))
    return f"{parts['total']:.1f} GiB of {gpu_mem_gib:g} ({detail})"


def launcher_command(family: str, size: str, layout: Layout) -> str:
    """The ``run_mcore_<family>.sh`` named-flag command for a layout."""
    flags = [f"--model-size {size}", f"--tp {layout.tp}", f"--pp {layout.pp}"]
    flags += [f"--vpp {layout.vpp}"] * (layout.vpp > 1)
    flags += [f"--ep {layout.ep} --etp {layout.expert_tp}"] * (layout.ep > 1)
    flags += [f"--sp {str(layout.sp).lower()}", f"--do {str(layout.distributed_optimizer).lower()}",
              f"--ac {layout.recompute}", f"--pr {layout.precision}",
              f"--mbs {layout.micro_batch}", f"--gbs {layout.global_batch}",
              f"--seq-len {layout.seq}"]
    return f"bash examples/{family}/run_mcore_{family}.sh " + " ".join(flags)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-patch plan",
        description="Propose TP/PP/DP/micro-batch/recompute for a model on N GPUs and report "
                    "the estimated memory per GPU.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model name, e.g. qwen2.5-7b, llama3.1-70b")
    source.add_argument("--hf-config-path", help="an HF model directory (its config.json)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    parser.add_argument("--seq", type=int, required=True, help="sequence length (tokens)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--gbs", type=int, default=None,
                        help="global batch in sequences (default 8 per GPU)")
    parser.add_argument("--mbs", type=int, default=None, help="pin the micro-batch size")
    parser.add_argument("--max-mbs", type=int, default=8, help="largest micro-batch tried")
    parser.add_argument("--tp", type=int, default=None, help="pin tensor parallelism")
    parser.add_argument("--pp", type=int, default=None, help="pin pipeline parallelism")
    parser.add_argument("--ep", type=int, default=None, help="pin expert parallelism (MoE)")
    parser.add_argument("--recompute", choices=list(RECOMPUTE_COST), default=None,
                        help="pin activation recompute")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node")
    parser.add_argument("--pr", default="bf16", choices=["bf16", "fp16", "fp8", "fp32"])
    parser.add_argument("--overhead", type=float, default=3.0,
                        help="GiB per GPU for the CUDA context, NCCL and fragmentation")
    parser.add_argument("--top", type=int, default=5, help="other fitting layouts to list")
    return parser


def pins(args: argparse.Namespace) -> dict:
    """The layout fields pinned by ``--tp/--pp/--ep/--mbs/--recompute`` (those given)."""
    given = {"tp": args.tp, "pp": args.pp, "ep": args.ep, "micro_batch": args.mbs,
             "recompute": args.recompute}
    return {key: value for key, value in given.items() if value is not None}


def _shape(args: argparse.Namespace) -> tuple[Shape, str | None, str | None]:
    """The model's shape and, for a table model, its family and MODEL_SIZE."""
    from megatron_patch.launch.model_sizes import find_model
    from megatron_patch.models.common.hf_config import load_hf_config
    from megatron_patch.models.registry import family_for_hf_config, get_family

    if args.model:
        family, model = find_model(args.model)
        hf, size = model.hf_config, model.size
    else:
        hf, size = load_hf_config(args.hf_config_path), args.hf_config_path
        family = family_for_hf_config(hf).name
    return Shape.from_megatron_args(get_family(family).hf_to_megatron(hf)), family, size


def main(argv: Sequence[str] | None = None) -> int:
    """Print the proposed layout, its memory per GPU and the launcher command."""
    args = _parser().parse_args(argv)
    try:
        shape, family, size = _shape(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gbs = args.gbs or 8 * args.gpus
    fixed = pins(args)
    found = candidates(shape, args.gpus, args.seq, gbs, gpu_mem_gib=args.gpu_mem,
                       gpus_per_node=args.gpus_per_node, precision=args.pr,
                       max_micro_batch=args.max_mbs,
                       overhead_gib=args.overhead, fixed=fixed)
    name = args.model or args.hf_config_path
    print(f"{name}: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads "
          f"({shape.groups} kv), vocab {shape.vocab}"
          + (f", {shape.experts} experts top-{shape.topk}" if shape.experts else "")
          + f"; {args.gpus} GPUs x {args.gpu_mem:g} GiB, seq {args.seq}, global batch {gbs}, "
          f"{args.pr}")
    if not found:
        print(f"no layout fits {args.gpu_mem:g} GiB per GPU; try more GPUs, a shorter --seq "
              "or a smaller --gbs", file=sys.stderr)
        return 1
    best = found[0]
    print(f"proposed: {describe(best.layout)}")
    print(f"estimated memory per GPU: {memory_line(best.memory, args.gpu_mem)}")
    print(f"  parameters per GPU: {best.memory.params / 1e9:.2f}B; pipeline bubble "
          f"{bubble_fraction(best.layout):.1%}; relative throughput {best.score:.2f}")
    if family and args.model:
        print(f"launch: {launcher_command(family, size, best.layout)}")
    if len(found) > 1 and args.top:
        print("other layouts that fit (relative throughput, GiB per GPU):")
        for other in found[1:args.top + 1]:
            print(f"  {other.score:.2f}  {other.memory.total / GIB:5.1f}  "
                  f"{describe(other.layout)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
