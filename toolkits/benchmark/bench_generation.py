"""Generation speed of megatron-patch against Hugging Face ``generate`` on the same model and GPU.

Both engines greedily generate ``--new-tokens`` tokens (end-of-sequence ignored) after prompts
of ``--prompt-len`` random tokens, at every batch size of ``--batches`` (default 1 and 32), with
the same randomly initialised Llama-shaped model in bf16:

- ``hf``: ``LlamaForCausalLM`` (SDPA attention), ``generate`` with its default cache;
- ``mcore``: the same weights converted to a Megatron checkpoint (``convert hf-to-mcore``),
  loaded and run as ``megatron-patch generate`` runs it (decode steps as CUDA graphs).

Each engine runs in its own process: one untimed warm-up run per batch size (same shapes), then
one timed run. Printed: generated tokens per second (prefill included), the mcore / hf ratio,
whether CUDA graphs were used, and whether both engines chose the same greedy tokens for the
first prompt (with random bf16 weights near-ties can differ late in the sequence).

GPU: ``python -m toolkits.benchmark.bench_generation [--shape 1.1b|8b] [--batches 1,32]``.
CPU smoke test (tiny model, fp32, about a minute): ``... bench_generation --tiny``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from toolkits.benchmark.worker_process import spawn_worker

SHAPES = {  # name -> (layers, hidden, ffn, heads, kv heads, vocab)
    "tiny": (2, 64, 128, 4, 2, 256),
    "1.1b": (22, 2048, 5632, 32, 4, 32000),  # TinyLlama-1.1B
    "8b": (32, 4096, 14336, 32, 8, 128256),  # Llama-3.1-8B
}
ENGINES = ("hf", "mcore")


def _prompts(opts: argparse.Namespace) -> torch.Tensor:
    vocab = SHAPES[opts.shape][5]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (max(opts.batches), opts.prompt_len), generator=generator)


def _device(opts: argparse.Namespace) -> str:
    return "cuda" if torch.cuda.is_available() and not opts.tiny else "cpu"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(run) -> tuple[float, object]:
    _synchronize()
    start = time.perf_counter()
    out = run()
    _synchronize()
    return time.perf_counter() - start, out


def run_hf(opts: argparse.Namespace) -> dict:
    """HF ``generate`` at every batch size: warm-up, then one timed run."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if opts.tiny else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(opts.hf_dir, dtype=dtype,
                                                 attn_implementation="sdpa")
    model = model.to(_device(opts)).eval()
    prompts = _prompts(opts).to(_device(opts))
    results = {}
    for batch in opts.batches:
        ids = prompts[:batch]

        def run(ids=ids):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=opts.new_tokens,
                                      min_new_tokens=opts.new_tokens, do_sample=False,
                                      pad_token_id=0)

        run()
        seconds, out = _timed(run)
        results[batch] = {"seconds": seconds, "first": out[0, opts.prompt_len:].tolist()}
    return results


def run_mcore(opts: argparse.Namespace) -> dict:
    """Our generation at every batch size: warm-up (captures the CUDA graph), then timed."""
    from megatron_patch.generation.engine import Generator, generate
    from megatron_patch.generation.model import load_inference_model, parse_inference_args
    from megatron_patch.generation.sampling import SamplingParams
    from megatron_patch.generation.stopping import StopChecker

    args = parse_inference_args(opts.mcore_dir, dtype="fp32" if opts.tiny else "bf16")
    loaded = load_inference_model(args, None)
    generator = Generator(loaded.model, vocab_rows=loaded.vocab_rows,
                          cuda_graphs=not opts.no_cuda_graphs)
    prompts = _prompts(opts).tolist()
    results = {}
    for batch in opts.batches:
        def run(batch=batch):
            return generate(generator, prompts[:batch], max_new_tokens=opts.new_tokens,
                            params=SamplingParams(greedy=True), stop=StopChecker(None),
                            batch_size=batch)

        run()
        seconds, out = _timed(run)
        results[batch] = {"seconds": seconds, "first": out[0].tokens,
                          "cuda_graphs": generator.cuda_graphs,
                          "graph_failure": generator.graph_failure}
    return results


def _build_models(opts: argparse.Namespace) -> None:
    """A random HF Llama of the shape, and its Megatron conversion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_patch.conversion import convert_hf_to_mcore

    layers, hidden, ffn, heads, kv_heads, vocab = SHAPES[opts.shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=vocab, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         max_position_embeddings=max(4096, opts.prompt_len + opts.new_tokens))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if opts.tiny:  # larger weights than HF's 0.02 init: fewer near-ties between tokens
        for param in model.parameters():
            param.data.normal_(0.0, 0.2)
    model.to(torch.float32 if opts.tiny else torch.bfloat16).save_pretrained(opts.hf_dir)
    del model
    convert_hf_to_mcore(opts.hf_dir, opts.mcore_dir, progress=False)


def _spawn(engine: str, opts: argparse.Namespace) -> dict:
    flags = ["--hf-dir", str(opts.hf_dir), "--mcore-dir", str(opts.mcore_dir),
             "--shape", opts.shape, "--batches", ",".join(map(str, opts.batches)),
             "--prompt-len", str(opts.prompt_len), "--new-tokens", str(opts.new_tokens),
             *(["--tiny"] if opts.tiny else []),
             *(["--no-cuda-graphs"] if opts.no_cuda_graphs else [])]
    results = spawn_worker("toolkits.benchmark.bench_generation", engine, flags)
    return {} if "failed" in results else {int(batch): result
                                           for batch, result in results.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny model on the CPU, fp32: a smoke test of this script")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="mcore: decode eagerly")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mcore-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the model, run each engine in a fresh process, print one table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parser().parse_args(argv)
    if opts.tiny and not opts.worker:
        opts.shape = "tiny"
        opts.batches = opts.batches if "--batches" in argv else "1,4"
        opts.prompt_len = opts.prompt_len if "--prompt-len" in argv else 16
        opts.new_tokens = opts.new_tokens if "--new-tokens" in argv else 16
    opts.batches = sorted({int(b) for b in str(opts.batches).split(",")})
    if opts.worker:
        run = run_hf if opts.worker == "hf" else run_mcore
        print("RESULT " + json.dumps(run(opts)), flush=True)
        return 0
    if not torch.cuda.is_available() and not opts.tiny:
        print("bench_generation: no CUDA device; use --tiny for the CPU smoke test")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        opts.hf_dir, opts.mcore_dir = Path(tmp) / "hf", Path(tmp) / "mcore"
        _build_models(opts)
        results = {engine: _spawn(engine, opts) for engine in ENGINES}
    layers, hidden, ffn, heads, kv_heads, vocab = SHAPES[opts.shape]
    device = torch.cuda.get_device_name() if _device(opts) == "cuda" else "CPU"
    print(f"\n{device}: shape {opts.shape} (layers {layers} hidden {hidden} ffn {ffn} heads "
          f"{heads}/{kv_heads} vocab {vocab}), {'fp32' if opts.tiny else 'bf16'}, prompt "
          f"{opts.prompt_len} tokens, {opts.new_tokens} new tokens (greedy), one timed run")
    print(f"{'batch':>6}{'hf tok/s':>12}{'mcore tok/s':>13}{'mcore/hf':>10}{'graphs':>8}"
          f"{'same first':>12}")
    rows = []
    for batch in opts.batches:
        hf, mcore = results["hf"].get(batch), results["mcore"].get(batch)
        tokens = batch * opts.new_tokens
        hf_rate = tokens / hf["seconds"] if hf else float("nan")
        mcore_rate = tokens / mcore["seconds"] if mcore else float("nan")
        same = "-"
        if hf and mcore:
            agree = next((i for i, (a, b) in enumerate(zip(hf["first"], mcore["first"]))
                          if a != b), len(hf["first"]))
            same = "yes" if agree == len(hf["first"]) else f"{agree} tok"
        graphs = "-" if not mcore else ("yes" if mcore["cuda_graphs"] else "no")
        print(f"{batch:>6}{hf_rate:>12,.1f}{mcore_rate:>13,.1f}{mcore_rate / hf_rate:>9.2f}x"
              f"{graphs:>8}{same:>12}")
        rows.append({"batch": batch, "hf_tokens_per_s": hf_rate,
                     "mcore_tokens_per_s": mcore_rate, "cuda_graphs": graphs, "same": same})
    failures = {r.get("graph_failure") for r in results["mcore"].values()} - {None}
    for failure in sorted(failures):
        print(f"CUDA graph capture failed ({failure}); those batches decoded eagerly")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"device": device, "shape": opts.shape,
                                               "rows": rows}, indent=2))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
