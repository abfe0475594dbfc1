"""When a sequence stops: an end-of-sequence token, a stop string, or its token budget."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Completion:
    """A finished sequence: its generated tokens (stop token included), text and reason."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class StopChecker:
    """Finds where generation stops; texts are the tokenizer's decoding of the tokens (empty
    without a tokenizer, which then allows no stop strings)."""

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int] = (),
                 stop_strings: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the completions")

    def _stop_at(self, text: str) -> int | None:
        found = [text.find(s) for s in self.stop_strings]
        found = [i for i in found if i >= 0]
        return min(found) if found else None

    def stop_length(self, tokens: list[int], checked: int) -> int | None:
        """Length of the sequence if it stops within ``tokens[checked:]``, else None.

        The stopping token (EOS, or the one that completes a stop string) is counted.
        """
        for length in range(checked + 1, len(tokens) + 1):
            if tokens[length - 1] in self.eos_ids:
                return length
            if self.stop_strings and self._stop_at(
                    self.tokenizer.detokenize(tokens[:length])) is not None:
                return length
        return None

    def complete(self, tokens: list[int], stopped: bool) -> Completion:
        """The completion of ``tokens``: text without the EOS token or the stop string."""
        kept = tokens[:-1] if stopped and tokens and tokens[-1] in self.eos_ids else tokens
        text = self.tokenizer.detokenize(kept) if self.tokenizer is not None else ""
        if stopped:
            cut = self._stop_at(text)
            text = text if cut is None else text[:cut]
        return Completion(list(tokens), text, "stop" if stopped else "length")
