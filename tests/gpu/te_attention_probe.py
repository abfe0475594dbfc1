"""Does Transformer Engine's fused (cuDNN) attention run at a given shape? One line per run.

    python -m tests.gpu.te_attention_probe [--head-dim 16] [--heads 4] [--kv-heads 2]

Diagnoses ``verify --train-steps`` under TE (tiny model: 4 query / 2 key-value heads of 16),
which failed on an H100 with cuDNN ``CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED`` at its first
fused-attention forward; run it with and without ``NVIDIA_TF32_OVERRIDE=0``.
"""

from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    """One bf16 causal forward + backward through TE's DotProductAttention; print the outcome."""
    import transformer_engine.pytorch as te

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    opts = parser.parse_args()
    kv_heads = opts.kv_heads or opts.heads
    attention = te.DotProductAttention(num_attention_heads=opts.heads, kv_channels=opts.head_dim,
                                       num_gqa_groups=kv_heads, attn_mask_type="causal",
                                       qkv_format="sbhd").cuda()
    shape = (opts.seq, opts.batch)
    q = torch.randn(*shape, opts.heads, opts.head_dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k, v = (torch.randn(*shape, kv_heads, opts.head_dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    case = (f"TF32_OVERRIDE={os.environ.get('NVIDIA_TF32_OVERRIDE', 'unset')} heads={opts.heads} "
            f"kv_heads={kv_heads} head_dim={opts.head_dim}")
    try:
        attention(q, k, v).float().sum().backward()
        torch.cuda.synchronize()
        print(f"{case}: OK", flush=True)
    except RuntimeError as error:
        print(f"{case}: FAIL {str(error)[-300:]}", flush=True)


if __name__ == "__main__":
    main()
