"""Write the shipped RLHF demo data (deterministic): preference pairs and sum-of-digits prompts.

``megatron_patch/assets/tiny_preferences.jsonl``: 400 ``{"prompt", "chosen", "rejected"}``
pairs whose chosen answer is a kind reply and rejected answer a rude one (a rule a tiny reward
model or DPO learns in a few dozen steps). ``megatron_patch/assets/tiny_sum_prompts.jsonl``: the
100 prompts ``"a+b="`` for digits a, b with ``"answer"`` their sum (GRPO's verifiable task).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "megatron_patch" / "assets"
SUBJECTS = ["the weather", "my code", "the train", "this book", "the meeting", "your plan",
            "the garden", "a new job", "the exam", "dinner"]
KIND = ["Thank you for asking, {s} is fine.", "Happy to help with {s}.",
        "Good question about {s}, thanks!", "I am glad you like {s}."]
RUDE = ["Go away, {s} is none of your business.", "Stop asking me about {s}.",
        "Nobody cares about {s}.", "Ugh, {s} again? Leave me alone."]
ASKS = ["What about {s}?", "Tell me about {s}.", "Any news on {s}?", "How is {s}?"]


def preference_records(count: int, seed: int = 0) -> list[dict]:
    """``count`` pairs: a question on a subject, a kind and a rude answer on it."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        subject = rng.choice(SUBJECTS)
        records.append({"prompt": rng.choice(ASKS).format(s=subject) + " ",
                        "chosen": rng.choice(KIND).format(s=subject),
                        "rejected": rng.choice(RUDE).format(s=subject)})
    return records


def sum_prompts() -> list[dict]:
    """Every ``a+b=`` for digits a and b, with its answer."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text("".join(json.dumps(r) + "\n" for r in records))
    scratch.replace(path)


if __name__ == "__main__":
    write_jsonl(ASSETS / "tiny_preferences.jsonl", preference_records(400))
    write_jsonl(ASSETS / "tiny_sum_prompts.jsonl", sum_prompts())
