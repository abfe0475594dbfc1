"""Forward+backward time of torch SDPA's backends for causal (GQA) attention on this GPU.

Compares flash, cuDNN and memory-efficient SDPA and compiled ``flex_attention`` on the same bf16
[b, heads, s, d] inputs (contiguous, or permuted views of Megatron's [s, b, heads, d] tensors),
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
    flops = 3.5 * 4 * b * h * s * s * d / 2  # fwd (2 GEMMs) + bwd (5 GEMMs), causal half
    print(f"{torch.cuda.get_device_name()}: b {b} heads {h}/{g} seq {s} dim {d}, causal; "
          "gqa = grouped K/V (enable_gqa), repeated = K/V repeated to the query heads, "
          "sbhd = Megatron's [s, b, heads, d] tensors permuted (non-contiguous views)")
    for memory in ("bhsd", "sbhd"):
        q, k, v, grad = (_input(memory, b, heads, s, d, grad=i < 3)
                         for i, heads in enumerate((h, g, g, h)))
        for name in (*BACKENDS, "flex"):
            for layout in ("gqa", "repeated"):
                if name == "flex" and layout == "repeated":
                    continue
                step = _step(name, layout, q, k, v, grad, h // g)
                try:
                    ms = _time_ms(step)
                except Exception as exc:  # noqa: BLE001 - report any backend failure and go on
                    print(f"  {memory} {name:<10}{layout:<10} unavailable: "
                          f"{str(exc).splitlines()[0][:90]}")
                    continue
                print(f"  {memory} {name:<10}{layout:<10}{ms:8.2f} ms "
                      f"{flops / ms / 1e9:8.0f} TFLOP/s")


def _input(memory: str, b: int, heads: int, s: int, d: int, grad: bool) -> torch.Tensor:
    """A [b, heads, s, d] bf16 tensor, contiguous or a view of an [s, b, heads, d] one."""
    shape = (b, heads, s, d) if memory == "bhsd" else (s, b, heads, d)
    tensor = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    if memory == "sbhd":
        tensor = tensor.permute(1, 2, 0, 3)
    return tensor.detach().requires_grad_(grad)


def _step(name: str, layout: str, q, k, v, grad, repeats: int):
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                 q.shape[2], k.shape[2])
        flex = torch.compile(flex_attention)

        def run_flex() -> None:
            flex(q, k, v, block_mask=mask, enable_gqa=True).backward(grad)
        return run_flex

    def run_sdpa() -> None:
        kk, vv = (k, v) if layout == "gqa" else (t.repeat_interleave(repeats, dim=1)
                                                   for t in (k, v))
        with sdpa_kernel([BACKENDS[name]]):
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True,
                                                 enable_gqa=layout == "gqa")
        out.backward(grad)
    return run_sdpa

if __name__ == "__main__":
    main()
