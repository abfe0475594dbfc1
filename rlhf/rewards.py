"""Rule-based rewards for GRPO: ``fn(prompts, completions, records) -> list[float]``.

``prompts``/``completions`` are texts (completions without their end-of-sequence token),
``records`` the prompt records (their ``answer`` and any other keys). Name one with
``--reward-fn module:function``; any importable callable of this shape works.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], list[float]]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> str:
    return text.replace(",", "").rstrip(".")


def final_answer(completion: str) -> str | None:
    """The answer of a GSM8K-style completion: the number after the last ``####``, else the
    last number in the text (commas dropped)."""
    tail = completion.rsplit("####", 1)[-1] if "####" in completion else completion
    numbers = _NUMBER.findall(tail)
    return _number(numbers[-1]) if numbers else None


def exact_match(prompts: Sequence[str], completions: Sequence[str],
                records: Sequence[dict]) -> list[float]:
    """1 when the completion's final answer equals the record's ``answer`` (GSM8K's ``####``
    line accepted there too), else 0."""
    return [float(final_answer(c) is not None and final_answer(c) == final_answer(str(r["answer"])))
            for c, r in zip(completions, records, strict=True)]


def leading_number(prompts: Sequence[str], completions: Sequence[str],
                   records: Sequence[dict]) -> list[float]:
    """Answers that must come first (``"3+4="`` -> ``"7"``): 1 when the completion starts with
    the record's ``answer`` and nothing but whitespace follows it; 0.2 when it starts with a
    wrong number (the format is right); else 0."""
    rewards = []
    for completion, record in zip(completions, records, strict=True):
        match = re.match(r"\s*(-?\d+)", completion)
        if match is None:
            rewards.append(0.0)
        elif match.group(1) == str(record["answer"]) and not completion[match.end():].strip():
            rewards.append(1.0)
        else:
            rewards.append(0.2)
    return rewards


def load_reward_fn(spec: str) -> RewardFn:
    """The callable named ``module:function`` (e.g. ``rlhf.rewards:exact_match``)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--reward-fn {spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--reward-fn {spec!r}: {error}") from None
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r} is not callable")
    return fn
