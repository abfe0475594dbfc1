"""Train a ~1B-parameter mixture-of-experts model in bf16 and report tokens/s.

The model is a Qwen3-MoE shape (``qwen3_moe`` family, built from its HF ``config.json`` like a
converted checkpoint): hidden 1024, 16 layers, 16 query / 4 key-value heads of 128, 32 experts
of FFN 512, top-4 routing, vocabulary 32000 - 0.96B parameters, 0.25B active per token. It
trains from scratch on mock tokens through ``megatron_patch.training.pretrain`` (sequence
2048, micro-batch 4, Adam, bf16 with fp32 main gradients), with expert parallelism over the
GPUs (``--ep``, default all), Transformer Engine's grouped GEMM for the experts when installed
(``--moe-grouped-gemm``; otherwise our torch ``grouped_mm`` experts, which fall back to
Megatron-Core's sequential experts where that kernel does not apply), and prints the median
tokens/s and TFLOP/s per GPU after warm-up, the loss and the router's load-balancing loss.

GPU:  ``python -m toolkits.benchmark.bench_moe_training [--steps 30] [--nproc N]``
CPU:  ``python -m toolkits.benchmark.bench_moe_training --tiny`` (tiny shape, fp32, 2 gloo
processes at EP=2, a few steps: checks the same path end to end). Without CUDA and without
``--tiny`` it prints why and exits 0. Extra arguments after ``--`` go to Megatron.
"""

from __future__ import annotations

import argparse
import sys

import torch

from toolkits.benchmark.training_runs import launch, summarize

SHAPES = {  # name -> (hidden, layers, heads, kv heads, head dim, experts, expert ffn, top-k, vocab)
    "1b": (1024, 16, 16, 4, 128, 32, 512, 4, 32000),
    "tiny": (64, 2, 4, 2, 16, 4, 32, 2, 256),
}


def hf_config(shape: str) -> dict:
    """The Qwen3-MoE ``config.json`` of ``shape``."""
    hidden, layers, heads, kv_heads, head_dim, experts, ffn, topk, vocab = SHAPES[shape]
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": 4 * ffn,
            "moe_intermediate_size": ffn, "num_experts": experts, "num_experts_per_tok": topk,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "router_aux_loss_coef": 0.001, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False}


def parameter_counts(config: dict) -> tuple[int, int]:
    """(total, active per token) parameters of ``config``'s model, counted on the meta device."""
    import transformers

    hf = transformers.Qwen3MoeConfig(**{k: v for k, v in config.items()
                                        if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * config["hidden_size"] * config["moe_intermediate_size"]
    idle = (config["num_experts"] - config["num_experts_per_tok"]) * expert
    return total, total - idle * config["num_hidden_layers"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the training process's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (fp32)")
    parser.add_argument("--steps", type=int, default=None, help="training iterations")
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs)")
    parser.add_argument("--ep", type=int, default=None, help="expert parallel size")
    parser.add_argument("--mbs", type=int, default=None, help="micro-batch size")
    parser.add_argument("--seq", type=int, default=None, help="sequence length")
    opts = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    gpu = torch.cuda.is_available() and not opts.tiny
    if not gpu and not opts.tiny:
        print("bench_moe_training: no CUDA device; run with --tiny for the CPU check")
        return 0
    shape = "tiny" if opts.tiny else "1b"
    nproc = opts.nproc or (torch.cuda.device_count() if gpu else 2)
    ep = opts.ep or nproc
    steps = opts.steps or (30 if gpu else 4)
    mbs, seq = opts.mbs or (4 if gpu else 2), opts.seq or (2048 if gpu else 32)
    config = hf_config(shape)
    total, active = parameter_counts(config)
    print(f"Qwen3-MoE {shape}: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active; "
          f"{nproc} process(es), EP={ep}, seq {seq}, micro-batch {mbs}", flush=True)
    from megatron_patch.models.common.grouped_experts import grouped_mm
    from megatron_patch.runtime.backends import available_backends

    grouped = gpu and available_backends().transformer_engine
    experts_label = "torch grouped_mm" if grouped_mm is not None else "sequential"
    flags = ["--dataset", "mock", "--seq-length", str(seq), "--micro-batch-size", str(mbs),
             "--global-batch-size", str(mbs * nproc), "--expert-model-parallel-size", str(ep),
             "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "2",
             "--train-iters", str(steps), "--log-interval", "1", "--eval-iters", "0",
             "--seed", "1234", *(["--bf16", "--no-torch-compile-layers"] if gpu else []),
             *(["--moe-grouped-gemm"] if grouped else []), *extra]
    run = launch(nproc, config, flags, gpu)
    rows = run["rows"]
    if run["returncode"] != 0 or not rows:
        print(run["tail"], file=sys.stderr)
        return run["returncode"] or 1
    for r in rows:
        print(f"  iteration {r['iteration']:3d}: {r['tokens_per_s']:10.1f} tokens/s  "
              f"{r['tflops_per_gpu']:6.1f} TFLOP/s/GPU  lm loss {r['lm_loss']:.4f}  "
              f"load_balancing_loss {r['load_balancing_loss']}")
    summary = summarize(rows, nproc)
    first, last = summary["timed_iterations"]
    print(f"median over iterations {first}-{last}: {summary['tokens_per_s']:.1f} tokens/s "
          f"({summary['tokens_per_s_per_gpu']:.1f} per GPU), "
          f"{summary['tflops_per_gpu']:.1f} TFLOP/s/GPU; experts: "
          f"{'Transformer Engine grouped GEMM' if grouped else experts_label}; "
          f"lm loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
