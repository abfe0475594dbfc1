"""Does Transformer Engine's fused (cuDNN) attention run at a given shape? One line per run.

    python -m tests.gpu.te_attention_probe [--head-dim 16] [--heads 4] [--kv-heads 2]
        [--torch-cudnn-first] [--te-own-cudnn]

Diagnoses ``verify --train-steps`` under TE, which failed on an H100 with cuDNN
``CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED`` at its first fused-attention forward after HF's
reference run. ``--torch-cudnn-first`` runs torch's cuDNN attention first (as HF's SDPA may);
``--te-own-cudnn`` lets TE search for cuDNN on its own (the CUDA toolkit's copy before torch's)
instead of sharing torch's (``megatron_patch.runtime.one_cudnn``). The line names every cuDNN
library file mapped into the process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def _mapped_cudnn_files() -> list[str]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in lines if "libcudnn" in line.split()[-1]})


def _torch_cudnn_attention() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()


def main() -> None:
    """One bf16 causal forward + backward through TE's DotProductAttention; print the outcome."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--torch-cudnn-first", action="store_true")
    parser.add_argument("--te-own-cudnn", action="store_true")
    opts = parser.parse_args()
    if not opts.te_own_cudnn:
        from megatron_patch.runtime.one_cudnn import share_torch_cudnn_with_transformer_engine

        share_torch_cudnn_with_transformer_engine()
    import transformer_engine.pytorch as te

    kv_heads = opts.kv_heads or opts.heads
    case = (f"TF32_OVERRIDE={os.environ.get('NVIDIA_TF32_OVERRIDE', 'unset')} heads={opts.heads} "
            f"kv_heads={kv_heads} head_dim={opts.head_dim} torch_cudnn_first="
            f"{opts.torch_cudnn_first} te_own_cudnn={opts.te_own_cudnn} "
            f"torch_cudnn={torch.backends.cudnn.version()}")
    try:
        if opts.torch_cudnn_first:
            _torch_cudnn_attention()
        attention = te.DotProductAttention(num_attention_heads=opts.heads,
                                           kv_channels=opts.head_dim, num_gqa_groups=kv_heads,
                                           attn_mask_type="causal", qkv_format="sbhd").cuda()
        shape = (opts.seq, opts.batch)
        q = torch.randn(*shape, opts.heads, opts.head_dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        k, v = (torch.randn(*shape, kv_heads, opts.head_dim, device="cuda", dtype=torch.bfloat16,
                            requires_grad=True) for _ in range(2))
        attention(q, k, v).float().sum().backward()
        torch.cuda.synchronize()
        outcome = "OK"
    except RuntimeError as error:
        outcome = f"FAIL {str(error)[-300:]}"
    print(f"{case}: {outcome}\n  cuDNN files mapped: {_mapped_cudnn_files()}", flush=True)


if __name__ == "__main__":
    main()
