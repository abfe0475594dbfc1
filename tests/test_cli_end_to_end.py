"""Every ``megatron-patch`` sub-command, end to end through the console script, on the CPU.

One family of each group - dense (Qwen3, padded vocabulary, untied), mixture-of-experts (Qwen3-MoE),
Multi-Latent Attention (DeepSeek-V3), legacy (Bloom: ALiBi, ``--format legacy``) and
vision-language (Qwen2-VL) - converted both ways, the round trip bit-identical, and verified
against transformers; the dense one also preprocessed, merged, pretrained from its converted
checkpoint (so its padded vocabulary rows are trained), exported, checked with ``verify
--train-steps``, fine-tuned on ``preprocess-sft`` output, generated from, evaluated and planned.
Each command runs in a fresh process, as a user runs it, so what only a fresh process shows
(e.g. the CPU runtime not yet applied) fails here. Tiny 2-layer models; the commands run in
two lanes at once (dense | the other families). ``card`` has its own subprocess test
(``tests/conversion/test_cards.py``), ``verify --layers`` and TP=2 relaunches theirs
(``test_fidelity.py``, ``test_parity.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_patch.conversion.tiny import save_random_model
from megatron_patch.utils.torchrun import free_port
from tests.conversion.tiny_models import read_safetensors, save_tokenizer, tiny_config
from tests.launch import REPO

pytestmark = pytest.mark.distributed  # a process per command, two at a time
SCRIPT = Path(sys.executable).with_name("megatron-patch")
VOCAB = 250  # the dense model's: conversion pads it to 256 rows
# group -> (tiny model case, extra ``convert hf-to-mcore`` flags)
FAMILIES = {"moe": ("qwen3_moe", []), "mla": ("deepseek_v3", []),
            "legacy": ("bloom", ["--format", "legacy"]), "vlm": ("qwen2_vl", [])}


@dataclass
class Step:
    """One command of a lane and, once run, its outcome."""

    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()  # earlier steps of its lane whose outputs it reads
    result: subprocess.CompletedProcess | None = None
    skipped: str | None = None  # why it did not run

    def check(self) -> str:
        """The command's stdout; fails the test with the command's output if it failed."""
        assert self.skipped is None, self.skipped
        result = self.result
        assert result.returncode == 0, (f"megatron-patch {' '.join(self.argv)} exited "
                                        f"{result.returncode}:\n{result.stdout[-3000:]}\n"
                                        f"{result.stderr[-5000:]}")
        return result.stdout


def run_cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``megatron-patch argv`` in a fresh process (the console script of this environment)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port())}
    return subprocess.run([str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _run_lane(steps: list[Step]) -> None:
    done = {}
    for step in steps:
        failed = [name for name in step.needs if not done[name]]
        if failed:
            step.skipped = f"not run: {', '.join(failed)} failed"
        else:
            step.result = run_cli(*step.argv)
        done[step.name] = step.result is not None and step.result.returncode == 0


def _tiny(case: str, path: Path) -> Path:
    """A random 2-layer HF model of a tiny_models case."""
    return save_random_model(tiny_config(case, num_hidden_layers=2), path, torch.float32, 0)


def _dense_lane(root: Path) -> list[Step]:
    hf = _tiny("qwen3", root / "qwen3")
    save_tokenizer(hf, VOCAB)
    words = [" ".join(f"t{(7 * i + 3 * j) % VOCAB}" for j in range(24)) for i in range(24)]
    shards = root / "shards"
    shards.mkdir()
    for part in range(2):
        (root / f"corpus{part}.jsonl").write_text(
            "".join(json.dumps({"text": w}) + "\n" for w in words[part::2]))
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": " ".join(w.split()[:4])},
        {"role": "assistant", "content": " " + " ".join(w.split()[4:12])}]}) + "\n"
        for w in words))
    (root / "prompts.txt").write_text("t5 t6 t7\nt9\n")
    mcore, trained, data = root / "qwen3-mcore", root / "trained", root / "corpus"
    tokenizer = ["--tokenizer-type", "HFTokenizer", "--tokenizer-path", str(hf)]
    train = ["--load", str(mcore), "--finetune", "--no-load-optim", "--no-load-rng",
             "--patch-tokenizer-type", "HFTokenizer", "--patch-tokenizer-path", str(mcore),
             "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "16",
             "--train-iters", "2", "--eval-iters", "0", "--log-interval", "1",
             # large constant steps: the padded vocabulary rows move far from zero
             "--lr", "0.05", "--lr-decay-style", "constant"]
    return [
        Step("hf-to-mcore", ["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(mcore),
                             "--no-progress"]),
        *(Step(f"preprocess-{part}", ["preprocess", "--input", str(root / f"corpus{part}.jsonl"),
                                      "--output-prefix", str(shards / f"corpus{part}"),
                                      *tokenizer, "--json-keys", "text", "--append-eod",
                                      "--workers", "1"]) for part in range(2)),
        Step("merge-datasets", ["merge-datasets", "--input", str(shards), "--output-prefix",
                                str(data)], ("preprocess-0", "preprocess-1")),
        Step("pretrain", ["pretrain", *train, "--data-path", str(data),
                          "--split", "100,0,0", "--save", str(trained), "--save-interval", "2"],
             ("hf-to-mcore", "merge-datasets")),
        Step("mcore-to-hf", ["convert", "mcore-to-hf", "--mcore-dir", str(trained), "--out",
                             str(root / "trained-hf"), "--hf-template", str(hf),
                             "--no-progress"], ("pretrain",)),
        Step("verify-train-steps", ["verify", "--hf-dir", str(root / "trained-hf"),
                                    "--mcore-dir", str(trained), "--train-steps", "3",
                                    "--seq-length", "16", "--plot", str(root / "curves.png")],
             ("mcore-to-hf",)),
        Step("generate", ["generate", "--load", str(mcore), "--input", str(root / "prompts.txt"),
                          "--output", str(root / "completions.jsonl"), "--greedy",
                          "--max-new-tokens", "4", "--ignore-eos"], ("hf-to-mcore",)),
        Step("eval-ppl", ["eval-ppl", "--load", str(mcore), "--data-path", str(data),
                          "--seq-length", "16", "--output",
                          str(root / "ppl.json")], ("hf-to-mcore", "merge-datasets")),
        Step("preprocess-sft", ["preprocess-sft", "--input", str(root / "chats.jsonl"),
                                "--output-prefix", str(root / "chats"), *tokenizer,
                                "--workers", "1"]),
        Step("finetune", ["finetune", *train, "--data-path", str(root / "chats"),
                          "--split", "100,0,0", "--sft-packing", "--seq-length", "32"],
             ("hf-to-mcore", "preprocess-sft")),
        Step("plan", ["plan", "--hf-config-path", str(hf), "--gpus", "8", "--seq", "64"]),
    ]


def _family_lane(root: Path) -> list[Step]:
    from tests.vlm.tiny_vlms import save_tiny_qwen_vl

    steps = []
    for group, (case, flags) in FAMILIES.items():
        hf = save_tiny_qwen_vl(root / case) if group == "vlm" else _tiny(case, root / case)
        mcore, back = root / f"{case}-mcore", root / f"{case}-back"
        steps += [
            Step(f"{group}-hf-to-mcore", ["convert", "hf-to-mcore", "--hf-dir", str(hf),
                                          "--out", str(mcore), "--no-progress", *flags]),
            Step(f"{group}-mcore-to-hf", ["convert", "mcore-to-hf", "--mcore-dir", str(mcore),
                                          "--out", str(back), "--no-progress"],
                 (f"{group}-hf-to-mcore",)),
            Step(f"{group}-verify", ["verify", "--hf-dir", str(hf), "--mcore-dir", str(mcore),
                                     "--seq-length", "16"], (f"{group}-hf-to-mcore",)),
        ]
    return steps


@pytest.fixture(scope="session")
def lanes(tmp_path_factory) -> dict[str, Step]:
    """Every step of both lanes, run (name -> step)."""
    root = tmp_path_factory.mktemp("cli")
    assert SCRIPT.is_file(), f"{SCRIPT}: the console script is not installed (pip install -e .)"
    dense, families = _dense_lane(root / "dense"), _family_lane(root / "families")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_run_lane, [dense, families]))
    return {step.name: step for step in dense + families}


def _dir(step: Step, flag: str) -> Path:
    return Path(step.argv[step.argv.index(flag) + 1])


@pytest.mark.parametrize("group", list(FAMILIES))
def test_convert_both_ways_is_bit_identical(lanes, group):
    """Issue 22: mcore-to-hf of MoE and MLA models failed on a CPU-only machine."""
    for direction in ("hf-to-mcore", "mcore-to-hf"):
        lanes[f"{group}-{direction}"].check()
    step = lanes[f"{group}-mcore-to-hf"]
    source = _dir(lanes[f"{group}-hf-to-mcore"], "--hf-dir")
    original, back = read_safetensors(source), read_safetensors(_dir(step, "--out"))
    assert original.keys() == back.keys()
    assert all(torch.equal(original[name], back[name]) for name in original)


@pytest.mark.parametrize("group", list(FAMILIES))
def test_verify_logits(lanes, group):
    assert "tp=1, pp=1): OK" in lanes[f"{group}-verify"].check()


def test_preprocess_merge_and_pretrain_from_the_converted_checkpoint(lanes):
    for name in ("hf-to-mcore", "preprocess-0", "preprocess-1", "merge-datasets"):
        lanes[name].check()
    out = lanes["pretrain"].check()
    assert "iteration        2/       2" in out and "lm loss" in out


def test_verify_train_steps_on_a_trained_padded_vocabulary(lanes):
    """Issue 22: the trained checkpoint's 250-token vocabulary is padded to 256 rows, whose
    output rows training moved; the HF reference trains with the same rows."""
    lanes["mcore-to-hf"].check()
    step = lanes["verify-train-steps"]
    assert "(tolerance 0.0001): OK" in step.check()
    assert _dir(step, "--plot").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((_dir(step, "--hf-dir") / "config.json").read_text())
    assert config["vocab_size"] == VOCAB


def test_generate_and_eval_ppl(lanes):
    lanes["generate"].check()
    records = [json.loads(line) for line in
               _dir(lanes["generate"], "--output").read_text().splitlines()]
    assert [r["completion_tokens"] for r in records] == [4, 4]
    lanes["eval-ppl"].check()
    ppl = json.loads(_dir(lanes["eval-ppl"], "--output").read_text())
    assert 1 < ppl["perplexity"] < 10 * VOCAB


def test_preprocess_sft_and_finetune(lanes):
    lanes["preprocess-sft"].check()
    out = lanes["finetune"].check()
    assert "iteration        2/       2" in out and "lm loss" in out


def test_plan(lanes):
    assert "proposed: TP=" in lanes["plan"].check()


def test_refusals_are_one_line(tmp_path):
    """A user error is one line naming the input, never a traceback."""
    result = run_cli("verify", "--hf-dir", str(tmp_path), "--mcore-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"megatron-patch verify: error: {tmp_path}/config.json: "
                                     f"expected a Hugging Face config.json in {tmp_path}")
