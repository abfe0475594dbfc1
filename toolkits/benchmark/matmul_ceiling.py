"""Measure the GPU's bf16 matmul ceiling (TFLOP/s), the denominator of the MFU we report."""

from __future__ import annotations

import argparse

import torch


def matmul_tflops(size: int = 8192, repeats: int = 20,
                  dtype: torch.dtype = torch.bfloat16) -> float:
    """Median TFLOP/s of ``size``^3 matrix products on random data (CUDA events)."""
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e12


def main() -> None:
    """Print the measured ceiling."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=8192)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: bf16 {args.size}^3 matmul "
          f"{matmul_tflops(args.size):.0f} TFLOP/s")


if __name__ == "__main__":
    main()
