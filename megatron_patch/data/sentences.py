"""A small, lossless regex sentence splitter (NLTK's punkt is not a dependency)."""

from __future__ import annotations

import re

# A sentence ends after . ! or ? (and closing quotes/brackets) before whitespace, or before a
# blank line. The whitespace that follows goes with the next sentence, so nothing is lost.
_BOUNDARY = re.compile(r"""[.!?]["'\)\]]*(?=\s)|\S(?=[ \t]*\n\s*\n)""")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``; joined back together they give ``text`` exactly."""
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        sentences.append(text[start:match.end()])
        start = match.end()
    tail = text[start:]
    if tail.strip() or not sentences:
        sentences.append(tail)
    else:
        sentences[-1] += tail
    return [s for s in sentences if s]
