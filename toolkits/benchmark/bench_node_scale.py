"""Node-scale training of a published model shape: the real run, or a one-GPU proxy and its
extrapolation.

    python -m toolkits.benchmark.bench_node_scale --model llama3.1-8b|qwen3-30b-a3b|<name>
        [--target-gpus 8] [--seq 8192] [--pr bf16|fp8] [--steps 50] [--ep N] [--tp N] [--pp N]
        [--gpu-mem 80] [--gbs N] [--devices N] [--out result.json] [--tiny] [-- Megatron flags]

The model is a ``megatron-patch plan`` table entry (a family's ``models/<family>/sizes.py``:
the real HF ``config.json`` values) with random weights, trained on mock tokens through
``megatron_patch.training.pretrain``; the layout is ``plan``'s best for ``--target-gpus``
(``--tp``/``--pp``/``--ep``/``--mbs``/``--recompute`` pin it, as in ``plan``).

- With at least ``--target-gpus`` devices, the real run: torchrun over the target with the
  layout's TP/PP/VPP/EP/ETP/SP/distributed optimizer/recompute/micro- and global batch.
- Otherwise a proxy on one device: the share of the model one target GPU holds, at TP=1 - the
  first pipeline stage's ``layers/PP`` layers with both the embedding and the output layer
  (the last stage's extra work, so the pipeline's slowest stage), ``experts/EP`` experts with
  the same top-k (each GPU's experts get the same token-expert assignments per token as in the
  target), the same micro-batch, recompute and sequence, and a global batch of
  ``MBS * min(micro-batches per DP rank, 4)``: the optimizer step is amortised over fewer
  micro-batches than in the target, so the proxy is conservative. A TP>1 layout runs at TP=1,
  one GPU doing all TP ranks' work. The target's figures are then extrapolated (labelled so):
  tokens/s/GPU = proxy tokens/s * (1 - bubble) / PP, FLOPs/token of the full model = PP *
  (proxy FLOPs/token - logit FLOPs/token) + logit FLOPs/token (Megatron's formula counts the
  output layer as ``6 * hidden * padded vocab`` per token), MFU against 989 TFLOP/s. The proxy
  does not measure pipeline send/receive, the data-parallel gradient reduce-scatter and
  parameter all-gather, tensor-parallel all-reduces/all-gathers nor the expert all-to-all, nor
  TP's smaller GEMMs; the memory model's estimate for the target GPU is printed beside the
  proxy's measured peak and the model's estimate for the proxy itself.

Printed for every run: the model, the target layout, each iteration, the median after warm-up
(first third dropped) of tokens/s, tokens/s/GPU, TFLOP/s/GPU and MFU, the peak memory per GPU
(``torch.cuda.max_memory_allocated`` of every rank, printed by each rank after training), the
loss first -> last and whether it is finite and falling, and for MoE the router's
``load_balancing_loss``. ``--out`` writes it all as JSON. ``--devices N`` pretends N devices
(e.g. the proxy on a full node, to check the extrapolation against the real run).

CPU: ``--tiny`` runs the same code on tiny stand-ins of the model
(``conversion.tiny.shrink_config``: 4 layers, hidden 64-256, at most 8 experts), fp32 on gloo,
sequence 64: a 2-process real run (target 2 "GPUs", pipeline 2 for dense models, EP 2 for MoE
unless pinned) and the 1-process proxy of the same target, a few steps each.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from megatron_patch.launch.memory import (
    GIB,
    Layout,
    Memory,
    Shape,
    bubble_fraction,
    estimate,
    total_params,
)
from megatron_patch.launch.plan import candidates, describe, memory_line, pins
from toolkits.benchmark.training_runs import H100_BF16_PEAK_TFLOPS, launch, summarize

PROXY_MICROBATCHES = 4
NOT_MEASURED = ("pipeline send/receive between stages", "data-parallel gradient reduce-scatter "
                "and parameter all-gather", "tensor-parallel all-reduce/all-gather (and TP's "
                "smaller GEMMs)", "expert-parallel all-to-all token exchange")
TINY = {"seq": 64, "steps": 6, "gbs_per_gpu": 4}


@dataclass(frozen=True)
class Target:
    """The model and the layout it is measured for."""

    name: str
    family: str
    hf_config: dict[str, Any]
    shape: Shape
    layout: Layout
    memory: Memory  # the memory model's estimate for the busiest target GPU


def model_config(name: str, tiny: bool) -> tuple[str, dict[str, Any], Shape]:
    """(family, HF config.json dict, memory-model shape) of a ``plan`` model name."""
    from megatron_patch.conversion.tiny import shrink_config
    from megatron_patch.launch.model_sizes import find_model
    from megatron_patch.models.registry import get_family

    family, model = find_model(name)
    config = shrink_config(model.hf_config) if tiny else dict(model.hf_config)
    return family, config, Shape.from_megatron_args(get_family(family).hf_to_megatron(config))


def plan_target(name: str, gpus: int, seq: int, gbs: int, precision: str, gpu_mem: float,
                fixed: dict[str, Any], tiny: bool = False) -> Target:
    """``plan``'s best layout for ``gpus``; ValueError naming the pins if none fits."""
    family, config, shape = model_config(name, tiny)
    found = candidates(shape, gpus, seq, gbs, gpu_mem_gib=gpu_mem, precision=precision,
                       fixed=fixed)
    if not found:
        raise ValueError(f"{name}: no layout for {gpus} GPUs x {gpu_mem:g} GiB, seq {seq}, "
                         f"global batch {gbs}, pins {fixed or 'none'} (see megatron-patch plan)")
    best = found[0]
    return Target(name, family, config, shape, best.layout, best.memory)


def proxy_shape(shape: Shape, layout: Layout) -> Shape:
    """One target GPU's share of the model at TP=1: the first stage's layers, experts / EP."""
    layers = shape.layers // layout.pp
    if not shape.experts:
        return replace(shape, layers=layers)
    experts = shape.experts // layout.ep
    if experts < shape.topk:
        raise ValueError(f"proxy: {shape.experts} experts / EP={layout.ep} = {experts} per GPU "
                         f"is fewer than top-k {shape.topk}; pin a smaller --ep")
    return replace(shape, layers=layers, experts=experts, moe_pattern=shape.moe_pattern[:layers])


def proxy_layout(layout: Layout) -> Layout:
    """One device, the target's micro-batch/sequence/recompute/precision, a shorter batch."""
    microbatches = min(layout.microbatches, PROXY_MICROBATCHES)
    return replace(layout, tp=1, pp=1, vpp=1, cp=1, dp=1, ep=1, etp=None, sp=False,
                   global_batch=layout.micro_batch * microbatches)


def proxy_model_flags(shape: Shape, layout: Layout) -> list[str]:
    """Megatron flags that cut the target model to its proxy (they win over the HF config)."""
    proxy = proxy_shape(shape, layout)
    flags = ["--num-layers", str(proxy.layers)]
    if shape.experts:
        flags += ["--num-experts", str(proxy.experts),
                  "--moe-layer-freq", str(list(proxy.moe_pattern)).replace(" ", "")]
    return flags


def logit_flops_per_token(hidden: int, padded_vocab: int) -> float:
    """Output layer FLOPs per token in Megatron's count: forward + 2 backward GEMMs, 2 per MAC."""
    return 6.0 * hidden * padded_vocab


def extrapolate(proxy_tokens_per_s: float, proxy_flops_per_token: float, layout: Layout,
                logit_flops: float, peak_tflops: float = H100_BF16_PEAK_TFLOPS
                ) -> dict[str, float]:
    """Target figures per GPU from a one-device proxy's tokens/s and FLOPs per token.

    The full model repeats the proxy's transformer layers PP times and has one output layer;
    a pipeline replica runs at the proxy's pace less the bubble, over PP GPUs (TP ranks share
    the proxy's work, so TP cancels out).
    """
    bubble = bubble_fraction(layout)
    full_flops = layout.pp * (proxy_flops_per_token - logit_flops) + logit_flops
    per_gpu = proxy_tokens_per_s * (1.0 - bubble) / layout.pp
    tflops = full_flops * per_gpu / 1e12
    return {"bubble": bubble, "proxy_flops_per_token": proxy_flops_per_token,
            "flops_per_token": full_flops, "tokens_per_s_per_gpu": per_gpu,
            "tokens_per_s": per_gpu * layout.world, "tflops_per_gpu": tflops,
            "mfu": tflops / peak_tflops}


def training_flags(layout: Layout, steps: int, moe: bool, gpu: bool) -> list[str]:
    """Megatron flags of ``layout`` (the launcher's own parallel/precision/recompute flags)."""
    from megatron_patch.launch.command import parallel_flags, precision_flags, recompute_flags
    from megatron_patch.launch.settings import RunSettings

    settings = RunSettings(tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp,
                           ep=layout.ep, etp=layout.etp, sp=layout.sp,
                           do=layout.distributed_optimizer, ac=layout.recompute,
                           pr=layout.precision)
    flags = [*parallel_flags(settings, moe), *precision_flags(layout.precision),
             *recompute_flags(layout.recompute),
             "--micro-batch-size", str(layout.micro_batch),
             "--global-batch-size", str(layout.global_batch), "--seq-length", str(layout.seq),
             "--dataset", "mock", "--train-iters", str(steps), "--lr", "3e-4", "--min-lr",
             "3e-5", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-iters", "0",
             "--seed", "1234"]
    if moe and gpu:  # as bench_moe_training: experts' token counts vary from step to step
        from megatron_patch.runtime.backends import available_backends

        flags.append("--no-torch-compile-layers")
        flags += ["--moe-grouped-gemm"] * available_backends().transformer_engine
    return flags


def _peak_gib(run: dict[str, Any]) -> tuple[str, float] | None:
    peaks = run["peak_memory"].values()
    if not peaks:
        return None
    return next(iter(peaks))["kind"], max(p["allocated"] for p in peaks) / GIB


def _print_run(label: str, run: dict[str, Any], summary: dict[str, Any], gpus: int) -> None:
    for r in run["rows"]:
        balance = r["load_balancing_loss"]
        print(f"  iteration {r['iteration']:3d}: {r['tokens_per_s']:11.1f} tokens/s "
              f"{r['tflops_per_gpu']:7.1f} TFLOP/s/GPU  lm loss {r['lm_loss']:.4f}"
              + (f"  load_balancing_loss {balance:.4f}" if balance is not None else ""))
    first, last = summary["timed_iterations"]
    print(f"{label}, median over iterations {first}-{last} ({gpus} device(s)): "
          f"{summary['tokens_per_s']:.1f} tokens/s, {summary['tokens_per_s_per_gpu']:.1f} "
          f"tokens/s/GPU, {summary['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU "
          f"{summary['mfu']:.1%} (of {H100_BF16_PEAK_TFLOPS:g})")
    peak = _peak_gib(run)
    if peak:
        print(f"  peak memory per device ({peak[0]}, max over ranks): {peak[1]:.1f} GiB")
    state = "finite" if summary["loss_finite"] else "NOT finite"
    state += " and falling" if summary["loss_falling"] else ", NOT falling"
    print(f"  lm loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} ({state}); "
          f"wall time {run['seconds']:.0f} s")
    if summary["load_balancing_loss"]:
        start, end = summary["load_balancing_loss"]
        print(f"  router load_balancing_loss {start:.4f} -> {end:.4f} (Megatron's aux loss "
              "before its coefficient: 1.0 is perfectly balanced)")


def run_real(target: Target, steps: int, gpu: bool, extra: list[str]) -> dict[str, Any] | None:
    """The target layout on ``layout.world`` processes; None when training failed."""
    moe = bool(target.shape.experts)
    flags = training_flags(target.layout, steps, moe, gpu) + extra
    print(f"real run on {target.layout.world} device(s)", flush=True)
    run = launch(target.layout.world, target.hf_config, flags, gpu)
    if run["returncode"] or not run["rows"]:
        print(f"training failed ({run['returncode']}):\n{run['tail']}", file=sys.stderr)
        return None
    summary = summarize(run["rows"], target.layout.world)
    _print_run("measured", run, summary, target.layout.world)
    print(f"  memory model for the busiest GPU: {target.memory.total / GIB:.1f} GiB")
    return {"branch": "real", "devices": target.layout.world, **run, "summary": summary}


def run_proxy(target: Target, steps: int, gpu: bool, extra: list[str], device_gib: float | None,
              force: bool) -> dict[str, Any] | None:
    """The one-device proxy of the target GPU and the extrapolation; None when it did not run."""
    shape, layout = proxy_shape(target.shape, target.layout), proxy_layout(target.layout)
    expected = estimate(shape, layout)
    print(f"proxy on 1 device: {shape.layers} layers"
          + (f", {shape.experts} experts top-{shape.topk}" if shape.experts else "")
          + f", embedding and output layer, TP=1, MBS={layout.micro_batch}, global batch "
          f"{layout.global_batch} ({layout.microbatches} micro-batches; the target has "
          f"{target.layout.microbatches} per DP rank: optimizer amortised over fewer, so "
          f"conservative), recompute={layout.recompute}")
    budget = memory_line(expected, device_gib) if device_gib else f"{expected.total / GIB:.2f} GiB"
    print(f"  memory model for the proxy: {budget}", flush=True)
    if device_gib is not None and expected.total / GIB > device_gib and not force:
        print(f"proxy will not fit: the memory model estimates {expected.total / GIB:.1f} GiB, "
              f"the device has {device_gib:.1f} GiB; use a larger GPU (e.g. nvidia-h200), a "
              "shorter --seq, or --force to try anyway", file=sys.stderr)
        return None
    moe = bool(target.shape.experts)
    flags = (training_flags(layout, steps, moe, gpu)
             + proxy_model_flags(target.shape, target.layout) + extra)
    run = launch(1, target.hf_config, flags, gpu)
    if run["returncode"] or not run["rows"]:
        print(f"proxy training failed ({run['returncode']}):\n{run['tail']}", file=sys.stderr)
        return None
    summary = summarize(run["rows"], 1)
    _print_run("proxy measured", run, summary, 1)
    logit = logit_flops_per_token(shape.hidden, shape.padded_vocab(1))
    result = extrapolate(summary["tokens_per_s"], run["flops_per_token"], target.layout, logit)
    peak = _peak_gib(run)
    print(f"EXTRAPOLATED to {target.layout.world} GPUs ({describe(target.layout)}), not "
          f"measured: {result['tokens_per_s_per_gpu']:.1f} tokens/s/GPU "
          f"({result['tokens_per_s']:.0f} tokens/s), {result['tflops_per_gpu']:.1f} "
          f"TFLOP/s/GPU, MFU {result['mfu']:.1%}; full model {result['flops_per_token'] / 1e9:.1f}"
          f" GFLOP/token (proxy {result['proxy_flops_per_token'] / 1e9:.1f}), pipeline bubble "
          f"{result['bubble']:.1%}")
    if peak:
        print(f"  memory per target GPU, memory model: {target.memory.total / GIB:.1f} GiB; "
              f"proxy measured {peak[1]:.1f} GiB ({peak[0]}) against its own estimate "
              f"{expected.total / GIB:.1f} GiB")
    print("  the proxy does not measure: " + "; ".join(NOT_MEASURED))
    return {"branch": "proxy", "devices": 1, **run, "summary": summary,
            "proxy_layout": asdict(layout), "proxy_memory_estimate_gib": expected.gib(),
            "extrapolated": result, "not_measured": list(NOT_MEASURED)}


def _write_json(path: str, payload: dict[str, Any]) -> None:
    from megatron_patch.utils.files import atomic_write_text

    for run in payload["runs"]:
        run.pop("tail", None)
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a plan model name, e.g. llama3.1-8b")
    parser.add_argument("--target-gpus", type=int, default=None, help="default 8 (--tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="default 8192 (--tiny: 64)")
    parser.add_argument("--pr", choices=["bf16", "fp8"], default="bf16",
                        help="precision on the GPU (--tiny: fp32)")
    parser.add_argument("--steps", type=int, default=None, help="default 50 (--tiny: 6)")
    parser.add_argument("--gbs", type=int, default=None, help="default 8 per target GPU")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per target GPU")
    for pin in ("tp", "pp", "ep", "mbs"):
        parser.add_argument(f"--{pin}", type=int, default=None, help=f"pin {pin.upper()}")
    parser.add_argument("--recompute", choices=["none", "sel", "full"], default=None)
    parser.add_argument("--devices", type=int, default=None,
                        help="devices to use (default: the CUDA GPUs; --tiny: 2 then 1)")
    parser.add_argument("--force", action="store_true",
                        help="run the proxy even if the memory model says it will not fit")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in on the CPU (fp32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every run trained with a finite loss."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    gpu = torch.cuda.is_available() and not opts.tiny
    if not gpu and not opts.tiny:
        print("bench_node_scale: no CUDA device; run with --tiny for the CPU check")
        return 0
    gpus = opts.target_gpus or (2 if opts.tiny else 8)
    seq = opts.seq or (TINY["seq"] if opts.tiny else 8192)
    steps = opts.steps or (TINY["steps"] if opts.tiny else 50)
    gbs = opts.gbs or (TINY["gbs_per_gpu"] if opts.tiny else 8) * gpus
    precision = "fp32" if opts.tiny else opts.pr
    fixed = pins(opts)
    if opts.tiny and not fixed:  # the shapes of the real targets: a pipeline, or EP
        fixed = {"ep": 2} if model_config(opts.model, True)[2].experts else {"pp": 2}
    try:
        target = plan_target(opts.model, gpus, seq, gbs, precision, opts.gpu_mem, fixed,
                             tiny=opts.tiny)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = target.shape
    print(f"{opts.model}{' (tiny stand-in)' if opts.tiny else ''}: {shape.layers} layers, "
          f"hidden {shape.hidden}, {shape.heads} heads ({shape.groups} kv), vocab {shape.vocab}"
          + (f", {shape.experts} experts top-{shape.topk}" if shape.experts else "")
          + f", {total_params(shape) / 1e9:.2f}B parameters; random init, mock tokens, "
          f"seq {seq}, {precision}, {steps} steps")
    print(f"target: {gpus} GPUs, {describe(target.layout)}, global batch {gbs}; plan's memory "
          f"per GPU {memory_line(target.memory, opts.gpu_mem)}", flush=True)
    if opts.tiny:
        device_counts = [opts.devices] if opts.devices else [gpus, 1]
    else:
        device_counts = [opts.devices or torch.cuda.device_count()]
    device_gib = (torch.cuda.get_device_properties(0).total_memory / GIB) if gpu else None
    runs = []
    for devices in device_counts:
        if devices >= gpus:
            run = run_real(target, steps, gpu, extra)
        else:
            run = run_proxy(target, steps, gpu, extra, device_gib, opts.force)
        if run is None:
            return 1
        runs.append(run)
    if opts.out:
        _write_json(opts.out, {"model": opts.model, "tiny": opts.tiny, "target_gpus": gpus,
                               "layout": describe(target.layout),
                               "layout_fields": asdict(target.layout),
                               "plan_memory_per_gpu_gib": target.memory.gib(), "runs": runs})
    return 0 if all(run["summary"]["loss_finite"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
