"""LoRA against full fine-tuning on one GPU: trainable parameters, peak memory, tokens/s.

    python -m toolkits.benchmark.bench_lora [--shape 3b|8b-proxy] [--seq 2048] [--mbs 4]
        [--rank 16] [--iters 10] [-- extra Megatron flags]

Each mode runs in its own process through :mod:`toolkits.benchmark.bench_training_step`'s
Megatron step (bf16, distributed optimizer, random weights and tokens): ``full`` trains every
parameter; ``lora`` adds rank ``--rank`` adapters (alpha 2 * rank) on all four linears of the
frozen model (torch-native linears, as LoRA runs use). The base is random here (its checkpoint
is not read). ``8b-proxy`` is Llama-3.1-8B with 16 of its 32 layers (4.5B parameters): its full
fine-tuning holds 18 bytes a parameter (bf16 weight, fp32 gradient, fp32 main weight, Adam's two
moments), 82 GB before activations, so it needs an H200; on an H100 the ``full`` row reports
running out of memory. Not run in CI: a GPU is needed.
"""

from __future__ import annotations

import argparse
import json
import sys

from toolkits.benchmark import bench_training_step as step_bench
from toolkits.benchmark.worker_process import spawn_worker

MODES = ("full", "lora")


def worker(opts: argparse.Namespace, extra: list[str]) -> None:
    """One mode's step time, peak memory and trainable parameters as one JSON line."""
    import torch

    from megatron_patch.training import loop

    if opts.worker == "lora":
        extra = [*extra, "--lora-rank", str(opts.rank)]
        # a random frozen base: skip reading one, keep the adapters-only checkpoints
        loop.use_base_checkpoint = lambda model, args: "random weights (benchmark)"
    captured = {}
    setup = loop.setup_model_and_optimizer

    def counting_setup(args, *rest, **kwargs):
        state = setup(args, *rest, **kwargs)
        params = [p for chunk in state.model for p in chunk.parameters()]
        captured["trainable"] = sum(p.numel() for p in params if p.requires_grad)
        captured["total"] = sum(p.numel() for p in params)
        return state

    loop.setup_model_and_optimizer = counting_setup
    torch.cuda.reset_peak_memory_stats()
    opts.profile = 0
    result = step_bench.run_mcore(opts, fp8=False, extra=extra)
    result |= captured | {"peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run both modes, each in a fresh process, and print one table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(step_bench.SHAPES), default="3b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    opts = parser.parse_args(own)
    if opts.worker:
        worker(opts, extra)
        return
    results = {mode: spawn_worker("toolkits.benchmark.bench_lora", mode, argv)
               for mode in MODES}
    tokens = opts.mbs * opts.seq
    print(f"shape {opts.shape} seq {opts.seq} mbs {opts.mbs}, LoRA rank {opts.rank}; median of "
          f"{opts.iters} steps; extra Megatron flags: {extra or 'none'}")
    print(f"{'mode':<6}{'trainable':>16}{'of total':>16}{'peak GiB':>10}{'step ms':>9}"
          f"{'tokens/s':>11}")
    for mode, result in results.items():
        if "failed" in result:
            print(f"{mode:<6}{result['failed']:>16}")
            continue
        print(f"{mode:<6}{result['trainable']:>16,}{result['total']:>16,}"
              f"{result['peak_gib']:>10.1f}{result['step_ms']:>9.1f}"
              f"{tokens / result['step_ms'] * 1e3:>11,.0f}")


if __name__ == "__main__":
    main()
