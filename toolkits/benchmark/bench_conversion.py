"""Benchmark HF <-> Megatron-Core conversion on a random ~1B Llama-shaped model.

    python toolkits/benchmark/bench_conversion.py [--layers 16] [--hidden 2048] [--ffn 5632]
        [--vocab 32000] [--dtype bf16] [--shard-size 2GB] [--format torch_dist] [--workdir DIR]
        [--tp 1] [--pp 1] [--preset llama3.1-8b]

Writes the random model as sharded safetensors (as ``save_pretrained`` would), converts it to a
Megatron checkpoint and back, each step in its own process, and reports seconds, GB/s of weights
and the peak RSS of each step (VmHWM; the baseline after imports is given separately),
then checks the round trip is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


PRESETS = {  # real HF config values (shapes); weights stay random
    "llama3.1-8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256),
}
PRESET_ROPE = {
    "llama3.1-8b": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}),
}


def _peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_random_model(path: Path, args: argparse.Namespace) -> int:
    """Random Llama weights in HF names, sharded; returns their bytes."""
    import torch
    import transformers

    from megatron_patch.conversion.hf_io import (
        ShardedSafetensorsWriter,
        dtype_name,
        parse_dtype,
        parse_size,
    )

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False, dtype=dtype_name(parse_dtype(args.dtype)),
        architectures=["LlamaForCausalLM"], **PRESET_ROPE.get(args.preset, {}))
    path.mkdir(parents=True)
    config.save_pretrained(path)
    dtype = parse_dtype(args.dtype)
    head_dim = args.hidden // args.heads
    layer = {"input_layernorm.weight": (args.hidden,),
             "self_attn.q_proj.weight": (args.hidden, args.hidden),
             "self_attn.k_proj.weight": (args.kv_heads * head_dim, args.hidden),
             "self_attn.v_proj.weight": (args.kv_heads * head_dim, args.hidden),
             "self_attn.o_proj.weight": (args.hidden, args.hidden),
             "post_attention_layernorm.weight": (args.hidden,),
             "mlp.gate_proj.weight": (args.ffn, args.hidden),
             "mlp.up_proj.weight": (args.ffn, args.hidden),
             "mlp.down_proj.weight": (args.hidden, args.ffn)}
    shapes = {"model.embed_tokens.weight": (args.vocab, args.hidden)}
    for i in range(args.layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (args.hidden,)
    shapes["lm_head.weight"] = (args.vocab, args.hidden)
    writer = ShardedSafetensorsWriter(path, parse_size(args.shard_size))
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape, generator=generator).mul_(0.02).to(dtype))
    writer.finish()
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_step(step: str, source: Path, target: Path, fmt: str, shard_size: str, tp: int = 1,
             pp: int = 1) -> dict:
    """One conversion in this process: seconds and peak RSS (also right after the imports)."""
    from megatron_patch.conversion import convert_hf_to_mcore, convert_mcore_to_hf

    baseline = _peak_rss_gb()
    start = time.perf_counter()
    if step == "hf2mcore":
        convert_hf_to_mcore(source, target, ckpt_format=fmt, tp=tp, pp=pp, progress=False)
    else:
        convert_mcore_to_hf(source, target, max_shard_size=shard_size, progress=False)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": _peak_rss_gb(),
            "baseline_rss_gb": baseline}


def _in_subprocess(step: str, source: Path, target: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--step", step, str(source), str(target), "--format",
               args.format, "--shard-size", args.shard_size, "--tp", str(args.tp),
               "--pp", str(args.pp)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"{step} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _identical(a: Path, b: Path) -> bool:
    import torch

    from megatron_patch.conversion.hf_io import HFCheckpoint

    left, right = HFCheckpoint(a), HFCheckpoint(b)
    if sorted(left.names) != sorted(right.names):
        return False
    return all(torch.equal(left.get(n), right.get(n)) for n in left.names)


def main() -> None:
    """Parse flags and run the benchmark (or one step of it, with ``--step``)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--shard-size", default="2GB",
                        help="safetensors shard size, of the random model and of the export")
    parser.add_argument("--format", default="torch_dist", choices=["torch_dist", "legacy"])
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size to convert to")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size to convert to")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a real model's shape (overrides the size flags)")
    parser.add_argument("--step", nargs=3, metavar=("STEP", "SOURCE", "TARGET"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.preset:
        vars(args).update(PRESETS[args.preset])
    if args.step:
        step, source, target = args.step
        print(json.dumps(run_step(step, Path(source), Path(target), args.format,
                                  args.shard_size, args.tp, args.pp)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        size = write_random_model(root / "hf", args)
        shards = len(list((root / "hf").glob("*.safetensors")))
        print(f"random model: {size / 1e9:.2f} GB of {args.dtype} weights in {shards} shard(s) "
              f"({args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}; "
              f"to TP={args.tp} PP={args.pp} {args.format}) "
              f"written in {time.perf_counter() - start:.1f} s")
        steps = [("hf2mcore", root / "hf", root / "mcore"), ("mcore2hf", root / "mcore",
                                                              root / "hf2")]
        for step, source, target in steps:
            result = _in_subprocess(step, source, target, args)
            print(f"{step}: {result['seconds']:.1f} s, {size / 1e9 / result['seconds']:.2f} GB/s, "
                  f"peak RSS {result['peak_rss_gb']:.2f} GB "
                  f"(after imports {result['baseline_rss_gb']:.2f} GB)")
        print(f"round trip bit-identical: {_identical(root / 'hf', root / 'hf2')}")


if __name__ == "__main__":
    main()
