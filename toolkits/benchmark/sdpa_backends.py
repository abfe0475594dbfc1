"""Forward+backward time of torch SDPA's backends for causal (GQA) attention on this GPU.

Compares flash, cuDNN and memory-efficient attention on the same [b, heads, s, d] bf16 inputs,
with grouped key/value heads passed as such (``enable_gqa``) or repeated to the query heads, and
reports TFLOP/s (causal: half the s x s work). Run: ``python -m toolkits.benchmark.sdpa_backends
[--batch 4 --heads 16 --kv-heads 8 --seq 2048 --dim 128]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    """Print one line per backend and K/V layout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in [("batch", 4), ("heads", 16), ("kv-heads", 8), ("seq", 2048),
                          ("dim", 128)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    opts = parser.parse_args()
    b, h, g, s, d = opts.batch, opts.heads, opts.kv_heads, opts.seq, opts.dim
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, g, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    flops = 3.5 * 4 * b * h * s * s * d / 2  # fwd (2 GEMMs) + bwd (5 GEMMs), causal half
    print(f"{torch.cuda.get_device_name()}: b {b} heads {h}/{g} seq {s} dim {d}, causal")
    for name, backend in BACKENDS.items():
        for layout in ("gqa", "repeated"):
            def step(backend=backend, layout=layout) -> None:
                kk, vv = (k, v) if layout == "gqa" else \
                    (t.repeat_interleave(h // g, dim=1) for t in (k, v))
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True,
                                                         enable_gqa=layout == "gqa")
                out.backward(grad)
            try:
                ms = _time_ms(step)
            except RuntimeError as exc:
                print(f"  {name:<10}{layout:<10} unavailable: {str(exc).splitlines()[0][:90]}")
                continue
            print(f"  {name:<10}{layout:<10}{ms:8.2f} ms {flops / ms / 1e9:8.0f} TFLOP/s")


if __name__ == "__main__":
    main()
