"""Every user journey on one GPU, once per software configuration, as one table.

    python -m tests.gpu.journeys --config te=/tmp/site-te --config torch=/tmp/site-torch

Each ``--config NAME=SITE`` is a directory of installed packages put first on ``PYTHONPATH``
(e.g. one with Transformer Engine, one without). Every journey runs the public commands a user
runs (``megatron-patch ...`` through its console entry, the ``examples/`` launchers) in a fresh
process on tiny models and the shipped data, several at a time; each row of the table gives,
per configuration, PASS/FAIL, the last logged loss (or the checked difference) and tokens/s.
Journeys of the second stage use what the first wrote (checkpoints), and the ``*-from-<other>``
rows load a checkpoint the other configuration trained (layer implementations interchange).
Logs are kept under ``--out`` (default ``output/journeys``). Exits 1 if any journey failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PORTS = itertools.count(31000, 7)
LOSS = re.compile(r"lm loss: ([0-9.E+-]+)")
TOKENS = re.compile(r"tokens per second: ([0-9.]+)")
DIFF = re.compile(r"max abs logits diff: ([0-9.e+-]+)")
TRAIN_GAP = re.compile(r"max relative: loss ([0-9.e+-]+)")
PPL = re.compile(r"perplexity[^0-9]*([0-9.]+)", re.IGNORECASE)
RL_LOSS = re.compile(r"(?:dpo loss|grpo loss|reward): ([0-9.E+-]+)")
ACC = re.compile(r"(?:\|acc\s*\|[^|]*\||\"acc,none\":)\s*([0-9.]+)")  # table or JSON

# tiny HF models the journeys convert (written by the "models" journey)
MAKE_MODELS = """
from pathlib import Path
from tests.conversion.tiny_models import save_tiny_model, save_tokenizer, tiny_config
CASES = "{cases}".split()
for case in ("llama3", "qwen3_moe", *CASES):
    out = Path("hf") / case
    save_tiny_model(case, out)
    save_tokenizer(out, tiny_config(case).vocab_size)
"""
ROUND_TRIP = """
import sys
from tests.conversion.tiny_models import read_safetensors
a, b = read_safetensors(sys.argv[1]), read_safetensors(sys.argv[2])
bad = sorted(k for k in a if k not in b or not a[k].equal(b[k])) + sorted(set(b) - set(a))
print("round trip: bit-identical" if not bad else f"round trip differs: {bad[:5]}")
sys.exit(1 if bad else 0)
"""
PRETRAIN = ("bash examples/llama/run_pretrain_mcore_llama.sh dsw tiny 8 16 1e-3 1e-4 128 128 {pr} "
            "1 1 1 false {do} {fl} {ac} {save} shipped none {tokens} 40960 {out} --save {out}/ckpt")
MP = "python3 -m megatron_patch.cli"
# further tiny families verified per configuration: rope variants, sliding window, MQA, MLA
VERIFIED_CASES = ("llama_yarn_mscale", "llama_longrope", "mistral", "llama_mqa", "deepseek_v3")


@dataclass(frozen=True)
class Journey:
    """A named shell script run in the configuration's work directory."""

    name: str
    script: str
    stage: int = 1
    check: re.Pattern | None = None  # the number reported instead of the loss
    needs: str | None = None  # an optional module; the journey is skipped where it is missing


def journeys(other: str | None) -> list[Journey]:
    """The journeys; ``other`` names the configuration whose checkpoints stage 3 loads."""
    rows = [
        Journey("models", "python3 -c '{}'".format(MAKE_MODELS.format(
            cases=" ".join(VERIFIED_CASES))), stage=0),
        Journey("convert hf-to-mcore-to-hf",
                f"{MP} convert hf-to-mcore --hf-dir hf/llama3 --out ckpt/llama && "
                f"{MP} convert mcore-to-hf --mcore-dir ckpt/llama --out hf/llama3-back && "
                f"python3 -c '{ROUND_TRIP}' hf/llama3 hf/llama3-back"),
        Journey("main job (FL DO, bf16)",
                PRETRAIN.format(pr="bf16", do="true", fl="true", ac="none", save=100,
                                tokens=409600, out="main")),
        Journey("launcher PR=fp8 AC=sel",
                PRETRAIN.format(pr="fp8", do="true", fl="true", ac="sel", save=1000,
                                tokens=81920, out="fp8")),
        Journey("launcher AC=full FL=false DO=false",
                PRETRAIN.format(pr="bf16", do="false", fl="false", ac="full", save=1000,
                                tokens=81920, out="full")),
        Journey("SFT packing (finetune demo)", "bash examples/llama/run_finetune_mcore_llama.sh"),
        Journey("DPO", "ITERS=4 bash examples/llama/run_dpo_mcore_llama.sh", check=RL_LOSS),
        Journey("GRPO", "ITERS=2 bash examples/llama/run_grpo_mcore_llama.sh", check=RL_LOSS),
        Journey("LLaVA demo", "OUTPUT=llava bash examples/llava/run_mcore_llava.sh"),
        Journey("Qwen2.5-VL demo",
                "OUTPUT=qwen2_5_vl bash examples/qwen2_5_vl/run_mcore_qwen2_5_vl.sh"),
        Journey("MoE convert + verify (qwen3_moe)",
                f"{MP} convert hf-to-mcore --hf-dir hf/qwen3_moe --out ckpt/moe && "
                f"{MP} verify --hf-dir hf/qwen3_moe --mcore-dir ckpt/moe", check=DIFF),
        *(Journey(f"convert + verify {case} (fp32)",
                  f"{MP} convert hf-to-mcore --hf-dir hf/{case} --out ckpt/{case} && "
                  f"{MP} verify --hf-dir hf/{case} --mcore-dir ckpt/{case}", check=DIFF)
          for case in VERIFIED_CASES),
        Journey("MoE verify --layers (fp32)",
                f"{MP} verify --hf-dir hf/qwen3_moe --mcore-dir ckpt/moe --layers", stage=2),
        Journey("MoE verify with TF32 allowed (diagnostic, always passes)",
                f"NVIDIA_TF32_OVERRIDE=1 {MP} verify --hf-dir hf/qwen3_moe --mcore-dir ckpt/moe"
                "; true", stage=2, check=DIFF),
        Journey("verify logits (fp32)", f"{MP} verify --hf-dir hf/llama3 --mcore-dir ckpt/llama",
                stage=2, check=DIFF),
        Journey("verify --train-steps 20 (bf16)",
                f"{MP} verify --hf-dir hf/llama3 --mcore-dir ckpt/llama --train-steps 20 "
                "--seq-length 64 --batch-size 4", stage=2, check=TRAIN_GAP),
        Journey("verify --train-steps 20 (fp32)",
                f"{MP} verify --hf-dir hf/llama3 --mcore-dir ckpt/llama --train-steps 20 "
                "--seq-length 64 --batch-size 4 --precision fp32", stage=2, check=TRAIN_GAP),
        Journey("MoE training from converted (grouped GEMM)",
                "bash examples/qwen3_moe/run_mcore_qwen3_moe.sh "
                "--load ckpt/moe --pr bf16 --mbs 4 --gbs 8 --seq-len 64 --train-iters 30 "
                "--warmup-iters 3 --save-interval 1000 --output moe-train",
                stage=2),
        Journey("resume main job",
                PRETRAIN.format(pr="bf16", do="true", fl="true", ac="none", save=100,
                                tokens=491520, out="main"), stage=2),
        Journey("generate (main job checkpoint)",
                f"echo '{{\"prompt\": \"The\"}}' > prompts.jsonl && {MP} generate --load "
                "main/ckpt --input prompts.jsonl --output gen.jsonl "
                "--max-new-tokens 16 && head -c 300 gen.jsonl", stage=2, check=re.compile("$^")),
        Journey("LoRA fine-tune (main job checkpoint) + export for PEFT, merged",
                "rm -rf lora && bash examples/llama/run_lora_mcore_llama.sh --model-size tiny "
                "--load main/ckpt --train-iters 30 --lr 1e-3 --min-lr 1e-4 --save lora/ckpt && "
                f"{MP} export-lora --load lora/ckpt --out lora/adapter && "
                f"{MP} export-lora --load lora/ckpt --out lora/merged --merge", stage=3),
        Journey("eval tiny_mc (lm-eval, converted checkpoint)",
                f"{MP} eval --load ckpt/llama --tasks tiny_mc --batch-size 8", stage=2,
                check=ACC, needs="lm_eval"),
        Journey("eval-ppl (converted checkpoint)",
                f"{MP} eval-ppl --load ckpt/llama --data-path "
                "$REPO/megatron_patch/assets/tiny_corpus.jsonl --seq-length 64",
                stage=2, check=PPL),
    ]
    if other:  # a checkpoint of the other layer implementation and Adam, trained on
        rows.append(Journey(
            f"resume from {other}'s main checkpoint",
            f"rm -rf cross && mkdir -p cross && cp -r ../{other}/main/ckpt cross/ && "
            + PRETRAIN.format(pr="bf16", do="true", fl="true", ac="none", save=100,
                              tokens=573440, out="cross"), stage=3))
        rows.append(Journey(  # the non-distributed optimizer: Adam's step count interchanges
            f"LLaVA resume from {other}'s checkpoint (DO=false)",
            f"rm -rf llava-cross && cp -r ../{other}/llava llava-cross && OUTPUT=llava-cross "
            "TRAIN_ITERS=50 bash examples/llava/run_mcore_llava.sh --override-opt_param-scheduler",
            stage=3))
    return rows


@dataclass
class Result:
    """One journey's outcome in one configuration."""

    ok: bool | None  # None: skipped
    value: str
    tokens: str
    seconds: float


def _importable(module: str, site: str) -> bool:
    """Whether ``module`` imports with ``site`` first on the path."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", probe],
                          env={**os.environ, "PYTHONPATH": f"{site}:{REPO}"}).returncode == 0


def run(journey: Journey, config: str, site: str, out: Path, timeout: float,
        end: float) -> Result:
    """Run one journey in ``out/config`` with ``site`` first on the path; parse its log.

    It is stopped after ``timeout`` seconds or at ``end`` (a ``time.time()``), and not started
    after ``end``."""
    timeout = min(timeout, end - time.time())
    if timeout <= 0:
        return Result(False, "not started (deadline)", "", 0.0)
    work = out / config
    work.mkdir(parents=True, exist_ok=True)
    if journey.needs and not _importable(journey.needs, site):
        return Result(None, f"{journey.needs} not installed", "", 0.0)
    env = {**os.environ, "PYTHONPATH": f"{site}:{REPO}", "PYTHONUNBUFFERED": "1",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1", "MASTER_PORT": str(next(PORTS)),
           "PYTHON": "python3", "REPO": str(REPO)}
    log = work / (re.sub(r"[^a-z0-9]+", "_", journey.name.lower()).strip("_") + ".log")
    start = time.time()
    script = journey.script.replace("examples/", f"{REPO}/examples/")
    with open(log, "w") as sink:
        try:
            code = subprocess.run(["bash", "-c", script], cwd=work, env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
            print(f"timed out after {timeout:.0f} s", file=sink)
    text = log.read_text(errors="replace")
    pattern = journey.check or LOSS
    values, tokens = pattern.findall(text), TOKENS.findall(text)
    value = (values[-1] if values else "") + (" (timed out)" if code is None else "")
    return Result(code == 0, value, f"{float(tokens[-1]):.0f}" if tokens else "",
                  time.time() - start)


def _verdict(result: Result) -> str:
    return {True: "PASS", False: "FAIL", None: "SKIP"}[result.ok]


def main(argv: list[str] | None = None) -> int:
    """Run every journey in every configuration; print the table; 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, metavar="NAME=SITE")
    parser.add_argument("--out", default=str(REPO / "output" / "journeys"))
    parser.add_argument("--parallel", type=int, default=6, help="journeys at a time")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run this journey (repeatable; the models are always made)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per journey")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole run (journeys left then are not started)")
    opts = parser.parse_args(argv)
    configs = dict(c.split("=", 1) for c in opts.config)
    names = list(configs)
    out = Path(opts.out).resolve()
    end = time.time() + (opts.deadline or float("inf"))
    results: dict[tuple[str, str], Result] = {}
    rows: dict[str, None] = {}
    plans = {c: journeys(names[(names.index(c) + 1) % len(names)] if len(names) > 1 else None)
             for c in names}
    with concurrent.futures.ThreadPoolExecutor(opts.parallel) as pool:
        for stage in range(4):
            futures = {}
            for config, plan in plans.items():
                for journey in plan:
                    wanted = opts.only is None or journey.stage == 0 or journey.name in opts.only
                    if journey.stage == stage and wanted:
                        futures[pool.submit(run, journey, config, configs[config], out,
                                            opts.timeout, end)] = (
                            journey.name, config)
                        rows[journey.name] = None  # the table's rows, in plan order
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                name, config = futures[future]
                r = results[(name, config)]
                print(f"[{config}] {name}: {_verdict(r)} ({r.seconds:.0f} s)", flush=True)
    width = max(map(len, rows))
    print(f"\n{'journey':<{width}} | " + " | ".join(f"{c:<30}" for c in names))
    print("-" * (width + 33 * len(names)))
    for name in rows:
        cells = []
        for config in names:
            r = results.get((name, config))
            if r is None:
                cells.append(f"{'-':<30}")
                continue
            cell = _verdict(r) + (f" {r.value}" if r.value else "")
            cell += f" {r.tokens} tok/s" if r.tokens else ""
            cells.append(f"{cell:<30}")
        print(f"{name:<{width}} | " + " | ".join(cells))
    print(f"\nlogs: {out}/<config>/<journey>.log")
    return int(any(r.ok is False for r in results.values()))


if __name__ == "__main__":
    sys.exit(main())
