"""Full training-step speed of megatron-patch against Hugging Face transformers and torchtitan
on one GPU.

Each engine trains the same Llama-shaped model on the same random tokens, one full step at a time
(forward, backward, gradient clipping at 1.0, AdamW update), in its own process so that compile
caches and memory do not leak between them:

- ``hf-compile``: ``LlamaForCausalLM`` (SDPA) with fp32 weights under bf16 autocast,
  ``torch.compile``, ``torch.optim.AdamW(fused=True)`` - the usual HF mixed-precision recipe;
- ``hf``: the same without ``torch.compile``;
- ``mcore``: our Megatron-Core model through our training step (bf16 weights, fp32 main
  gradients, distributed-optimizer Adam), with the default GPU fast paths;
- ``mcore-fp8``: the same with ``--fp8-format hybrid`` (Transformer Engine when installed,
  else torchao float8 GEMMs);
- ``titan``: torchtitan's (0.3.0, needs torch >= 2.13) Llama 3 model at the same shape, built
  and trained the way its ``Trainer`` does on one GPU, from its own functions: fp32 weights under
  FSDP2's bf16 mixed-precision policy (``parallelize_llama``), ``torch.compile`` per block and of
  the loss, FlexAttention (``--titan-attn``), chunked cross-entropy, its CUDA graph of
  forward+backward (``--titan-eager`` turns it off), ``default_adamw`` (fused; betas 0.9/0.95,
  weight decay 0.1) with its LR schedule; no activation checkpointing, like the others;
- ``titan-fp8``: the same with torchtitan's float8 converter (torchao ``Float8Linear``, its
  default rowwise recipe) on every linear layer but the output layer (``filter_fqns`` as in its
  Llama 3 405B recipe).

Prints the median of ``--iters`` timed steps (CUDA events, after warm-up): tokens/s, model
TFLOP/s by Megatron's FLOP formula, MFU against the 989 TFLOP/s H100 dense bf16 peak and against
the bf16 matmul ceiling measured in the same run, peak GPU memory, and the ratio to
``hf-compile``. Run on one GPU: ``python -m toolkits.benchmark.bench_training_step
[--shape 1.1b|3b|8b-proxy] [--seq 2048] [--mbs 4 | --best-mbs 1,2,4,8]
[--engines hf-compile,mcore,mcore-fp8,titan] [-- extra Megatron flags]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

import megatron_patch  # noqa: F401  (first: Transformer Engine shares torch's cuDNN, runtime.one_cudnn)
from toolkits.benchmark.worker_process import spawn_worker

if TYPE_CHECKING:
    from torchtitan.models.llama3 import Llama3Model

H100_BF16_PEAK_TFLOPS = 989.0
SHAPES = {  # name -> (layers, hidden, ffn, heads, kv heads, vocab)
    "1.1b": (16, 2048, 8192, 16, 8, 32000),
    "3b": (28, 3072, 8192, 24, 8, 32000),
    # Llama-3.1-8B with 16 of its 32 layers: bench_node_scale's one-GPU proxy of PP=2
    "8b-proxy": (16, 4096, 14336, 32, 8, 128256),
}
ENGINES = ("hf", "hf-compile", "mcore", "mcore-fp8", "titan", "titan-fp8")
TITAN_FFN_MULTIPLE = 256  # torchtitan multiple_of; a matching multiplier gives SHAPES ffn


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


def _tokens(opts: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    vocab = SHAPES[opts.shape][5]
    return torch.randint(0, vocab, (opts.mbs, opts.seq), generator=generator).cuda()


def run_hf(opts: argparse.Namespace, compiled: bool) -> dict:
    """Full HF training step: fp32 weights, bf16 autocast, fused AdamW, grad clipping."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, ffn, heads, kv_heads, vocab = SHAPES[opts.shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=opts.seq, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="sdpa")
    model = LlamaForCausalLM(config).cuda()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = _tokens(opts)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_ms = _median_ms(step, opts.warmup, opts.iters)
    if opts.profile:
        _print_profile(step, opts.profile)
    return {"step_ms": step_ms}


def titan_model_config(shape: tuple[int, ...], seq: int, *, fp8: bool, compiled: bool,
                       attn: str) -> Llama3Model.Config:
    """torchtitan's ``Llama3Model.Config`` at ``shape`` (untied output, RoPE theta 1e4 unscaled,
    RMSNorm eps 1e-5), float8 through its converter with the output layer left in bf16."""
    from torchtitan.components.quantization import Float8LinearConverter
    from torchtitan.models.common import (
        ComplexRoPE,
        Embedding,
        Linear,
        RMSNorm,
        compute_ffn_hidden_dim,
    )
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
    )
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    layers, hidden, ffn, heads, kv_heads, vocab = shape
    multiplier = ffn / int(8 * hidden / 3)
    ffn_dim = compute_ffn_hidden_dim(hidden, multiple_of=TITAN_FFN_MULTIPLE,
                                     ffn_dim_multiplier=multiplier)
    assert ffn_dim == ffn, f"torchtitan ffn {ffn_dim} != {ffn}"
    config = Llama3Model.Config(
        dim=hidden, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=hidden,
                                        param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=hidden, eps=1e-5, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=hidden, out_features=vocab,
                              param_init=_output_linear_init(hidden)),
        layers=_build_llama3_layers(
            n_layers=layers, dim=hidden, n_heads=heads, n_kv_heads=kv_heads, hidden_dim=ffn_dim,
            rope=ComplexRoPE.Config(dim=hidden // heads, max_seq_len=seq),
            attn_backend=attn))
    for layer in config.layers:
        assert layer.attention_norm.eps == layer.ffn_norm.eps == 1e-5
    if fp8:
        converter = Float8LinearConverter.Config(
            filter_fqns=["lm_head"], model_compile_enabled=compiled,
            emulate=not torch.cuda.is_available())  # emulated only when checked on a CPU
        config = converter.build().convert(config)
    set_llama3_sharding_config(config, enable_sp=True)  # what Llama3Model.Config adds on update
    return config


def build_titan_step(shape: tuple[int, ...], tokens: torch.Tensor, *, fp8: bool, compiled: bool,
                     cuda_graphs: bool, attn: str = "flex") -> Callable[[], torch.Tensor]:
    """torchtitan's one-GPU training step from its own pieces, as its ``Trainer`` assembles them
    (no activation checkpointing: no engine here recomputes); the step returns the loss."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.config import CommConfig, CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.cudagraph import wrap_with_cuda_graph
    from torchtitan.models.llama3 import parallelize_llama
    from torchtitan.tools import utils

    mbs, seq = tokens.shape
    training = TrainingConfig(local_batch_size=mbs, seq_len=seq, max_norm=1.0,
                              disable_cuda_graphs=not cuda_graphs)
    parallelism = ParallelismConfig()
    compile_config = CompileConfig(enable=compiled)
    world_size = dist_utils.init_distributed(CommConfig(trace_buf_size=0))
    parallel_dims = ParallelDims.from_config(parallelism, world_size)
    dist_utils.set_spmd_backend(parallelism.spmd_backend)
    config = titan_model_config(shape, seq, fp8=fp8, compiled=compiled, attn=attn)
    with torch.device("meta"), utils.set_default_dtype(torch.float32):
        model = config.build()
    model.verify_module_protocol()
    model = parallelize_llama(model, parallel_dims=parallel_dims, training=training,
                              parallelism=parallelism, compile_config=compile_config,
                              ac_config=None, dump_folder="")
    model.to_empty(device=utils.device_type)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    loss_fn = ChunkedLossWrapper.Config(
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=shape[5])).build(
        compile_config=compile_config)
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    optimizers = default_adamw(lr=1e-4).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config().build(optimizers=optimizers, training_steps=1000)
    train_context = dist_utils.get_spmd_context(parallel_dims=parallel_dims)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(seq, device=tokens.device).expand_as(tokens)
    valid_tokens = torch.tensor(labels.numel(), device=tokens.device)

    def forward_backward(inputs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                         extra: dict) -> torch.Tensor:
        with train_context():
            loss, _ = loss_fn(model(inputs, **extra), targets, valid,
                              positions=extra["positions"])
            loss.backward()
        return loss

    fwd_bwd = wrap_with_cuda_graph(forward_backward) if cuda_graphs else forward_backward

    def step() -> torch.Tensor:
        optimizers.zero_grad(set_to_none=not cuda_graphs)
        extra = {"positions": positions,
                 "attention_masks": model.get_attention_masks(positions=positions)}
        loss = fwd_bwd(tokens, labels, valid_tokens, extra)
        dist_utils.clip_grad_norm_(list(model.parameters()), training.max_norm, foreach=True)
        optimizers.step()
        schedulers.step()
        return loss

    return step


def run_titan(opts: argparse.Namespace, fp8: bool) -> dict:
    """torchtitan's full training step at our shape, compiled as its trainer compiles it."""
    step = build_titan_step(SHAPES[opts.shape], _tokens(opts), fp8=fp8, compiled=True,
                            cuda_graphs=not opts.titan_eager, attn=opts.titan_attn)
    step_ms = _median_ms(step, opts.warmup, opts.iters)
    if opts.profile:
        _print_profile(step, opts.profile)
    return {"step_ms": step_ms}


def _megatron_argv(opts: argparse.Namespace, fp8: bool, extra: list[str]) -> list[str]:
    layers, hidden, ffn, heads, kv_heads, vocab = SHAPES[opts.shape]
    return [
        "--num-layers", str(layers), "--hidden-size", str(hidden),
        "--ffn-hidden-size", str(ffn), "--num-attention-heads", str(heads),
        "--group-query-attention", "--num-query-groups", str(kv_heads),
        "--seq-length", str(opts.seq), "--max-position-embeddings", str(opts.seq),
        "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu",
        "--position-embedding-type", "rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
        "--hidden-dropout", "0", "--dataset", "mock", "--vocab-size", str(vocab),
        "--make-vocab-size-divisible-by", "128", "--micro-batch-size", str(opts.mbs),
        "--global-batch-size", str(opts.mbs), "--bf16", "--lr", "1e-4", "--clip-grad", "1.0",
        "--train-iters", "1000", "--use-distributed-optimizer", "--seed", "1",
        *(["--fp8-format", "hybrid"] if fp8 else []), *extra,
    ]


def run_mcore(opts: argparse.Namespace, fp8: bool, extra: list[str]) -> dict:
    """Our full training step (and its forward+backward alone) with Megatron's FLOP count."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.training import num_floating_point_operations

    from megatron_patch.arguments import parse_training_args
    from megatron_patch.training.initialize import initialize
    from megatron_patch.training.loop import (
        _configure_model_hooks,
        gpt_forward_step,
        setup_model_and_optimizer,
        train_step,
    )

    args = parse_training_args(_megatron_argv(opts, fp8, extra))
    initialize(args)
    args.padded_vocab_size = SHAPES[opts.shape][5]
    state = setup_model_and_optimizer(args)
    _configure_model_hooks(state)
    tokens = _tokens(opts)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1),
             "loss_mask": torch.ones_like(tokens, dtype=torch.float),
             "position_ids": torch.arange(opts.seq, device="cuda").expand_as(tokens)}

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
            num_microbatches=get_num_microbatches(), seq_length=opts.seq,
            micro_batch_size=opts.mbs, decoder_seq_length=opts.seq, forward_only=False)

    def step() -> None:
        train_step(state, [Repeat()], gpt_forward_step, args)

    step_ms = _median_ms(step, opts.warmup, opts.iters)
    if opts.profile:
        _print_profile(step, opts.profile)
    return {"step_ms": step_ms,
            "fwd_bwd_ms": _median_ms(forward_backward, 2, opts.iters),
            "flops": num_floating_point_operations(args, opts.mbs),
            "fp8": getattr(args, "torchao_float8", None) or ("te" if args.fp8 else None)}


_KERNEL_KINDS = (  # (label, substrings of CUDA kernel names), first match wins
    ("attention", ("cudnn", "fmha", "flash", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "matmul")),
    ("compiled (triton)", ("triton",)),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("cross-entropy/softmax", ("softmax", "log_softmax", "nll", "cross_entropy")),
)


def _kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in _KERNEL_KINDS if any(k in lowered for k in keys)),
                "other")


def _print_profile(step: Callable[[], None], steps: int) -> None:
    """Profile ``steps`` steps: GPU-busy share of the wall time, time per kernel kind and the
    top kernels (lines prefixed ``PROFILE`` so the parent process shows them)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        ms = event.time_range.elapsed_us() / 1e3
        by_kind[_kernel_kind(event.name)] = by_kind.get(_kernel_kind(event.name), 0.0) + ms
        by_name.setdefault(event.name, []).append(ms)
    busy = sum(by_kind.values()) / steps
    print(f"PROFILE per step: wall {wall_ms:.1f} ms, GPU busy {busy:.1f} ms "
          f"({busy / wall_ms:.0%}), {len(kernels) / steps:.0f} kernels", flush=True)
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"PROFILE   {kind:<24}{ms / steps:8.2f} ms", flush=True)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    for name, times in top:
        print(f"PROFILE   {sum(times) / steps:8.2f} ms {len(times) / steps:5.0f}x  {name[:110]}",
              flush=True)


def worker(opts: argparse.Namespace, extra: list[str]) -> None:
    """Run one engine and print its result as one JSON line."""
    torch.cuda.reset_peak_memory_stats()
    if opts.worker.startswith("hf"):
        result = run_hf(opts, compiled=opts.worker == "hf-compile")
    elif opts.worker.startswith("titan"):
        result = run_titan(opts, fp8=opts.worker == "titan-fp8")
    else:
        result = run_mcore(opts, fp8=opts.worker == "mcore-fp8", extra=extra)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(engine: str, argv: list[str]) -> dict:
    return spawn_worker("toolkits.benchmark.bench_training_step", engine, argv, echo="PROFILE ")


def _with_mbs(argv: list[str], mbs: int) -> list[str]:
    """``argv`` with the micro-batch size set to ``mbs`` (before any ``--`` Megatron flags)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return [*argv[:cut], "--mbs", str(mbs), *argv[cut:]]


def best_micro_batch(engine: str, argv: list[str], sizes: list[int]) -> dict:
    """The engine's fastest result (tokens/s) over ``sizes`` tried in increasing order, up to
    the first that fails (out of memory); its ``mbs`` is recorded."""
    best: dict = {}
    for mbs in sorted(sizes):
        result = _spawn(engine, _with_mbs(argv, mbs)) | {"mbs": mbs}
        if "failed" in result:
            return best or result
        if not best or mbs / result["step_ms"] > best["mbs"] / best["step_ms"]:
            best = result
    return best


def _measure_ceiling() -> float:
    from toolkits.benchmark.matmul_ceiling import matmul_tflops

    ceiling = matmul_tflops()
    gc.collect()
    torch.cuda.empty_cache()
    return ceiling


def main(argv: list[str] | None = None) -> None:
    """Run the chosen engines, each in a fresh process, and print one table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--best-mbs", default=None, metavar="SIZES",
                        help="comma-separated micro-batch sizes: each engine runs at each, in "
                             "increasing order until one does not fit, and reports its fastest "
                             "(instead of --mbs for all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--engines", default="hf-compile,mcore,mcore-fp8")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of each engine: GPU-busy share, time per "
                             "kernel kind, top kernels")
    parser.add_argument("--titan-attn", choices=("flex", "flex_flash", "varlen"), default="flex",
                        help="torchtitan's attention backend (its Llama 3 default: flex)")
    parser.add_argument("--titan-eager", action="store_true",
                        help="torchtitan without its default CUDA graph of forward+backward")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    opts = parser.parse_args(own)
    if opts.worker:
        worker(opts, extra)
        return
    engines = opts.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from {ENGINES}")
    ceiling = _measure_ceiling()
    if opts.best_mbs:
        sizes = [int(size) for size in opts.best_mbs.split(",")]
        results = {e: best_micro_batch(e, argv, sizes) for e in engines}
    else:
        results = {engine: _spawn(engine, argv) | {"mbs": opts.mbs} for engine in engines}
    # Megatron's FLOPs of one step (mcore engines), per token: the same model for every engine
    flops_per_token = next((r["flops"] / (r["mbs"] * opts.seq) for r in results.values()
                            if "flops" in r), None)
    layers, hidden, ffn, heads, kv_heads, vocab = SHAPES[opts.shape]
    batches = f"best mbs of {opts.best_mbs}" if opts.best_mbs else f"mbs {opts.mbs}"
    print(f"\n{torch.cuda.get_device_name()}: measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s; "
          f"shape {opts.shape} (layers {layers} hidden {hidden} ffn {ffn} heads {heads}/"
          f"{kv_heads} vocab {vocab}) seq {opts.seq} {batches}; full training step, median "
          f"of {opts.iters}; extra Megatron flags: {extra or 'none'}")
    rate = {e: r["mbs"] * opts.seq / r["step_ms"] * 1e3 for e, r in results.items()
            if "step_ms" in r}
    print(f"{'engine':<14}{'mbs':>4}{'step ms':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU/989':>9}"
          f"{'MFU/ceil':>10}{'peak GiB':>10}{'vs hf-compile':>15}")
    for engine, result in results.items():
        if engine not in rate:
            print(f"{engine:<14}{result.get('mbs', ''):>4} {result.get('failed', 'failed')}")
            continue
        tflops = flops_per_token * rate[engine] / 1e12 if flops_per_token else float("nan")
        ratio = f"{rate[engine] / rate['hf-compile']:.2f}x" if "hf-compile" in rate else "-"
        print(f"{engine:<14}{result['mbs']:>4}{result['step_ms']:>9.1f}{rate[engine]:>11,.0f}"
              f"{tflops:>9.0f}{tflops / H100_BF16_PEAK_TFLOPS:>9.1%}{tflops / ceiling:>10.1%}"
              f"{result['peak_gib']:>10.1f}{ratio:>15}")
    for engine, result in results.items():
        if "fwd_bwd_ms" in result:
            print(f"  {engine}: forward+backward alone {result['fwd_bwd_ms']:.1f} ms; "
                  f"fp8: {result['fp8'] or 'off'}")


if __name__ == "__main__":
    main()
