"""Training-step speed of megatron-patch against Hugging Face transformers on the same GPU.

One process, one GPU, the same Llama-shaped model and the same random tokens for every engine:

- ``hf``: ``LlamaForCausalLM`` (SDPA attention), bf16 weights, forward + backward;
- ``hf-compile``: the same under ``torch.compile``;
- ``mcore``: megatron-patch's Megatron-Core model (Megatron's bf16 mixed precision: bf16 compute,
  fp32 main gradients), forward + backward through Megatron's pipeline schedule, and the full
  optimizer step (distributed-optimizer Adam, grad clipping) as ``mcore-step``.

Reports the median of ``--iters`` timed steps after warm-up (CUDA events), tokens/s, the ratio to
``hf-compile``, and MFU: model FLOPs (Megatron's formula) per second over the bf16 matmul ceiling
measured in the same run. Run: ``torchrun --nproc-per-node 1 toolkits/benchmark/
bench_training_step.py [--layers 16 --hidden 2048 ...] [-- extra Megatron flags]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable

import torch

from megatron_patch.arguments import parse_training_args
from megatron_patch.training.initialize import initialize
from megatron_patch.training.loop import (
    _configure_model_hooks,
    gpt_forward_step,
    setup_model_and_optimizer,
    train_step,
)
from toolkits.benchmark.matmul_ceiling import matmul_tflops


def _median_ms(step: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _hf_config(shape: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab, max_position_embeddings=shape.seq, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )


def bench_hf(shape: argparse.Namespace, tokens: torch.Tensor, compiled: bool) -> float:
    """Median forward+backward milliseconds of the HF model."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_hf_config(shape)).to(device="cuda", dtype=torch.bfloat16)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        forward(input_ids=tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)

    return _median_ms(step, shape.warmup, shape.iters)


def _release_gpu_memory() -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _megatron_argv(shape: argparse.Namespace, extra: list[str]) -> list[str]:
    return [
        "--num-layers", str(shape.layers), "--hidden-size", str(shape.hidden),
        "--ffn-hidden-size", str(shape.ffn), "--num-attention-heads", str(shape.heads),
        "--group-query-attention", "--num-query-groups", str(shape.kv_heads),
        "--seq-length", str(shape.seq), "--max-position-embeddings", str(shape.seq),
        "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu",
        "--position-embedding-type", "rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
        "--hidden-dropout", "0", "--dataset", "mock", "--vocab-size", str(shape.vocab),
        "--make-vocab-size-divisible-by", "128", "--micro-batch-size", str(shape.mbs),
        "--global-batch-size", str(shape.mbs), "--bf16", "--lr", "1e-4",
        "--train-iters", "1000", "--use-distributed-optimizer", "--seed", "1", *extra,
    ]


def bench_mcore(shape: argparse.Namespace, tokens: torch.Tensor, extra: list[str]
                ) -> tuple[float, float, float]:
    """(forward+backward ms, full optimizer-step ms, model FLOPs per step) of megatron-patch."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.training import num_floating_point_operations

    args = parse_training_args(_megatron_argv(shape, extra))
    initialize(args)
    args.padded_vocab_size = shape.vocab
    state = setup_model_and_optimizer(args)
    _configure_model_hooks(state)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1),
             "loss_mask": torch.ones_like(tokens, dtype=torch.float),
             "position_ids": torch.arange(shape.seq, device="cuda").expand_as(tokens)}

    class Repeat:
        def __iter__(self):
            return self

        def __next__(self):
            return batch

    def forward_backward() -> None:
        for chunk in state.model:
            chunk.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=Repeat(), model=state.model,
            num_microbatches=get_num_microbatches(), seq_length=shape.seq,
            micro_batch_size=shape.mbs, decoder_seq_length=shape.seq, forward_only=False)

    fwd_bwd = _median_ms(forward_backward, shape.warmup, shape.iters)
    full = _median_ms(lambda: train_step(state, [Repeat()], gpt_forward_step, args),
                      shape.warmup, shape.iters)
    return fwd_bwd, full, num_floating_point_operations(args, shape.mbs)


def main(argv: list[str] | None = None) -> None:
    """Run all engines and print one table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in [("layers", 16), ("hidden", 2048), ("ffn", 8192), ("heads", 16),
                          ("kv-heads", 8), ("vocab", 32000), ("seq", 2048), ("mbs", 4),
                          ("warmup", 5), ("iters", 10)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--engines", default="hf,hf-compile,mcore")
    shape = parser.parse_args(argv)
    engines = shape.engines.split(",")
    torch.manual_seed(0)
    tokens = torch.randint(0, shape.vocab, (shape.mbs, shape.seq), device="cuda")
    step_tokens = shape.mbs * shape.seq
    ceiling = matmul_tflops()
    rows: dict[str, float] = {}
    if "hf" in engines:
        rows["hf (sdpa)"] = bench_hf(shape, tokens, compiled=False)
        _release_gpu_memory()
    if "hf-compile" in engines:
        rows["hf + torch.compile"] = bench_hf(shape, tokens, compiled=True)
        _release_gpu_memory()
    flops = None
    if "mcore" in engines:
        rows["megatron-patch"], full, flops = bench_mcore(shape, tokens, extra)
    print(f"\n{torch.cuda.get_device_name()}: bf16 matmul ceiling {ceiling:.0f} TFLOP/s; "
          f"layers {shape.layers} hidden {shape.hidden} ffn {shape.ffn} heads {shape.heads}/"
          f"{shape.kv_heads} vocab {shape.vocab} seq {shape.seq} mbs {shape.mbs}; "
          f"median of {shape.iters}; extra Megatron flags: {extra or 'none'}")
    reference = rows.get("hf + torch.compile")
    print(f"{'engine (forward+backward)':<28}{'ms':>9}{'tokens/s':>12}{'vs hf+compile':>15}"
          f"{'MFU':>8}")
    for name, ms in rows.items():
        ratio = f"{reference / ms:.2f}x" if reference else "-"
        mfu = f"{flops / (ms / 1e3) / 1e12 / ceiling:.1%}" if flops else "-"
        print(f"{name:<28}{ms:>9.1f}{step_tokens / ms * 1e3:>12,.0f}{ratio:>15}{mfu:>8}")
    if flops:
        print(f"{'megatron-patch full step':<28}{full:>9.1f}{step_tokens / full * 1e3:>12,.0f}"
              f"{'(+optimizer)':>15}{flops / (full / 1e3) / 1e12 / ceiling:>8.1%}")


if __name__ == "__main__":
    main()
