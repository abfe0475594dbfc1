"""Benchmark-evaluation speed: ``megatron-patch eval``'s model against lm-eval's HF backend.

Both serve the same lm-eval requests on the same randomly initialised Llama-shaped model (bf16,
one GPU, the shipped tokenizer), ``--batch-size`` at a time:

- ``loglikelihood``: ``--requests`` requests, each a context of ``--context-chars`` characters of
  the shipped corpus and a few words of continuation;
- ``multiple_choice``: ``--requests`` requests, four one-letter answers to each of a quarter as
  many contexts (both engines score the answers of one context from one sequence);
- ``generate_until``: ``--requests / 8`` greedy requests (``max_gen_toks`` 64, stopping at a
  blank line).

Engines:

- ``hf``: ``lm_eval.models.huggingface.HFLM`` (transformers, SDPA attention);
- ``mcore``: :class:`megatron_patch.evaluation.harness_lm.MegatronLM` on the converted checkpoint.

Each engine runs in its own process: an untimed warm-up on a tenth of the requests, then the
timed run. Printed: requests per second of each kind, the mcore / hf ratio, and the largest
log-likelihood difference (bf16: small, not zero).

GPU: ``python -m toolkits.benchmark.bench_eval [--shape 1.1b] [--batch-size 32]``.
CPU smoke test (tiny model, fp32): ``... bench_eval --tiny``. Of lm-eval it needs the package
alone (``pip install --no-deps --target DIR lm_eval-*.whl``, ``PYTHONPATH=DIR``): the requests
are built here, so neither ``datasets`` nor lm-eval's task machinery is imported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from toolkits.benchmark.bench_generation import SHAPES
from toolkits.benchmark.worker_process import spawn_worker

ENGINES = ("hf", "mcore")
KINDS = ("loglikelihood", "multiple_choice", "generate_until")
CHOICES = (" A", " B", " C", " D")


def _requests(opts: argparse.Namespace) -> dict[str, list]:
    """The lm-eval requests of each kind (the same for both engines)."""
    from lm_eval.api.instance import Instance

    corpus = Path(__file__).resolve().parents[2] / "megatron_patch/assets/tiny_corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    texts = [t for t in texts if len(t) > opts.context_chars + 40][:opts.requests]
    pairs = [(t[:opts.context_chars], " " + " ".join(t[opts.context_chars:].split()[:3]))
             for t in texts]
    until = {"until": ["\n\n"], "max_gen_toks": 64, "do_sample": False}
    questions = [context for context, _ in pairs[:max(1, len(pairs) // len(CHOICES))]]
    return {"loglikelihood": [Instance("loglikelihood", {}, pair, i)
                              for i, pair in enumerate(pairs)],
            "multiple_choice": [Instance("loglikelihood", {}, (context, choice), i)
                                for i, context in enumerate(questions) for choice in CHOICES],
            "generate_until": [Instance("generate_until", {}, (context, until), i)
                               for i, (context, _) in enumerate(pairs[:max(1, len(pairs) // 8)])]}


def _model(opts: argparse.Namespace, engine: str):
    if engine == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(opts.hf_dir), dtype="float32" if opts.tiny else "bfloat16",
                    device="cuda" if torch.cuda.is_available() and not opts.tiny else "cpu",
                    batch_size=opts.batch_size, max_length=opts.max_length)
    from megatron_patch.evaluation.harness_lm import MegatronLM
    from megatron_patch.generation.model import (
        load_inference_model,
        load_tokenizer,
        parse_inference_args,
    )

    args = parse_inference_args(opts.mcore_dir, dtype="fp32" if opts.tiny else "bf16",
                                seq_length=opts.max_length, micro_batch_size=opts.batch_size)
    return MegatronLM(load_inference_model(args, load_tokenizer(args)),
                      batch_size=opts.batch_size, max_length=opts.max_length, progress=False)


def run_worker(opts: argparse.Namespace) -> dict:
    """One engine: warm-up, then every kind of request timed."""
    model = _model(opts, opts.worker)
    results = {}
    for kind, requests in _requests(opts).items():
        serve = getattr(model, requests[0].request_type)
        serve(requests[:max(1, len(requests) // 10)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        answers = serve(requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        results[kind] = {"seconds": time.perf_counter() - start, "requests": len(requests),
                         "answers": [a if kind == "generate_until" else a[0] for a in answers]}
    return results


def _build(opts: argparse.Namespace) -> None:
    """A random HF Llama of the shape with the shipped tokenizer, and its conversion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_patch.conversion import convert_hf_to_mcore
    from megatron_patch.tokenizer.hf import TINY_TOKENIZER_DIR

    layers, hidden, ffn, heads, kv_heads, vocab = SHAPES[opts.shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=max(vocab, 2048), rms_norm_eps=1e-5, bos_token_id=None,
                         eos_token_id=0, pad_token_id=0, max_position_embeddings=opts.max_length)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if opts.tiny else torch.bfloat16)
    model.save_pretrained(opts.hf_dir)
    del model
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy(file, opts.hf_dir / file.name)
    convert_hf_to_mcore(opts.hf_dir, opts.mcore_dir, progress=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--context-chars", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, fp32")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mcore-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the model, run each engine in a fresh process, print one table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parser().parse_args(argv)
    if opts.tiny:
        opts.shape = "tiny"
        opts.requests, opts.batch_size, opts.max_length = 32, 8, 256
        opts.context_chars = 300
    if opts.worker:
        print("RESULT " + json.dumps(run_worker(opts)), flush=True)
        return 0
    if not torch.cuda.is_available() and not opts.tiny:
        print("bench_eval: no CUDA device; use --tiny for the CPU smoke test")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        opts.hf_dir, opts.mcore_dir = Path(tmp) / "hf", Path(tmp) / "mcore"
        _build(opts)
        flags = ["--hf-dir", str(opts.hf_dir), "--mcore-dir", str(opts.mcore_dir), *argv]
        results = {engine: spawn_worker("toolkits.benchmark.bench_eval", engine, flags)
                   for engine in ENGINES}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}: shape {opts.shape}, batch {opts.batch_size}, "
          f"max_length {opts.max_length}, {'fp32' if opts.tiny else 'bf16'}")
    for kind in KINDS:
        rates = {e: r[kind]["requests"] / r[kind]["seconds"] for e, r in results.items()
                 if "failed" not in r}
        line = "  ".join(f"{e} {rate:8.1f} req/s" for e, rate in rates.items())
        if len(rates) == 2:
            line += f"  mcore/hf {rates['mcore'] / rates['hf']:.2f}x"
            if kind != "generate_until":
                diff = max(abs(a - b) for a, b in zip(results["hf"][kind]["answers"],
                                                      results["mcore"][kind]["answers"]))
                line += f"  max |loglikelihood difference| {diff:.3g}"
            else:
                same = sum(a == b for a, b in zip(results["hf"][kind]["answers"],
                                                  results["mcore"][kind]["answers"]))
                line += f"  same text {same}/{len(results['hf'][kind]['answers'])}"
        print(f"{kind:>15}: {line}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
