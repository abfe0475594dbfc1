"""Values from Megatron-format iteration lines, and the shipped RLHF data."""

import re

from tests.launch import REPO

PREFERENCES = REPO / "megatron_patch" / "assets" / "tiny_preferences.jsonl"
SUM_PROMPTS = REPO / "megatron_patch" / "assets" / "tiny_sum_prompts.jsonl"
COMMON = ["--patch-tokenizer-type", "ByteTokenizer", "--attention-dropout", "0",
          "--hidden-dropout", "0", "--num-workers", "0", "--log-interval", "1"]
# a random 2-layer Llama (hidden 64, GQA 4/2) on the byte vocabulary, 16-token rows
TINY_LLAMA = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
              "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
              "--seq-length", "16", "--max-position-embeddings", "16", "--normalization",
              "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
              "--disable-bias-linear", "--untie-embeddings-and-output-weights",
              "--make-vocab-size-divisible-by", "1"]


def logged(output: str, key: str) -> dict[int, float]:
    """Iteration -> the value logged under ``key``."""
    pattern = re.compile(rf"iteration\s+(\d+)/\s*\d+ \|.*? {re.escape(key)}: ([0-9.E+-]+) \|")
    return {int(i): float(v) for i, v in pattern.findall(output)}


def mean(values: dict[int, float], iterations) -> float:
    """Mean of the values at ``iterations``."""
    chosen = [values[i] for i in iterations]
    return sum(chosen) / len(chosen)


def signed_leading_number(prompts, completions, records) -> list[float]:
    """``rlhf.rewards.leading_number`` mapped to [-1, 1]: returns start far from a zero critic."""
    from rlhf.rewards import leading_number

    return [2 * r - 1 for r in leading_number(prompts, completions, records)]


def check_clipping_and_throughput(output: str, iterations: int, name: str) -> None:
    """Two policy steps per rollout: no clipping on its first, some on a second; the run
    printed positive rollout and training tokens/s."""
    clip = logged(output, "clip fraction")
    assert all(clip[i] == 0 for i in range(1, iterations + 1, 2))  # first step on each rollout
    assert any(clip[i] > 0 for i in range(2, iterations + 1, 2)), clip
    throughput = re.search(rf"{name} throughput: rollout ([0-9.]+) tokens/s .* training "
                           r"([0-9.]+) tokens/s", output)
    assert throughput and float(throughput.group(1)) > 0 and float(throughput.group(2)) > 0

