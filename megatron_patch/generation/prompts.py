"""Generation input and output files.

Input: one prompt per line. A line starting with ``{`` is a JSON object with ``"prompt"`` (text)
or ``"messages"`` (a chat: ``[{"role": ..., "content": ...}, ...]``, rendered with the
tokenizer's chat template and its generation prompt); an optional ``"id"`` is copied to the
output. Any other line is the prompt text itself. Blank lines are ignored. With ``chat=True``
text prompts become a single user message. A malformed line (bad UTF-8 or JSON, missing or
non-text fields, a chat template error, no tokens, too long) is reported with its line number
and skipped, or stops the run, by ``on_error``.

Output: JSON lines in input order, written to a temporary file and renamed when complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from megatron_patch.data.bad_records import BadRecords
from megatron_patch.data.encoder import RecordError
from megatron_patch.data.sft_encoder import render
from megatron_patch.utils.files import atomic_write_text

Message = dict[str, str]


@dataclass
class Prompt:
    """One input prompt, tokenized."""

    index: int  # position among the valid prompts: output order and sampling seed offset
    line: int  # 1-based line number in the input file
    source: str | list[Message]  # the prompt text or chat messages as given
    tokens: list[int]
    id: Any = None


def _messages(value: object) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RecordError("'messages' is not a non-empty list")
    for number, turn in enumerate(value, start=1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                and isinstance(turn.get("content"), str)):
            raise RecordError(f"'messages' turn {number} is not an object with text 'role' and "
                              "'content'")
    return [{"role": turn["role"], "content": turn["content"]} for turn in value]


def parse_line(raw: bytes) -> tuple[str | list[Message], Any] | None:
    """(prompt text or messages, id) of one input line; None for a blank line."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise RecordError(f"not UTF-8 ({error.reason})") from None
    if not text.strip():
        return None
    if not text.lstrip().startswith("{"):
        return text, None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"bad JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise RecordError("not a JSON object")
    if "messages" in record:
        return _messages(record["messages"]), record.get("id")
    if "prompt" not in record:
        raise RecordError("no 'prompt' or 'messages' key")
    if not isinstance(record["prompt"], str):
        raise RecordError(f"'prompt' is not text (got {type(record['prompt']).__name__})")
    return record["prompt"], record.get("id")


def encode_prompt(tokenizer: Any, source: str | list[Message], chat: bool) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template (with the generation
    prompt, as ``apply_chat_template`` tokenizes), text as the tokenizer encodes it."""
    if isinstance(source, str) and not chat:
        return list(tokenizer.tokenize(source))
    messages = [{"role": "user", "content": source}] if isinstance(source, str) else source
    if getattr(tokenizer, "chat_template", None):
        try:
            return list(tokenizer.apply_chat_template(messages, tokenize=True,
                                                      add_generation_prompt=True))
        except (jinja2.TemplateError, ValueError, TypeError) as error:
            raise RecordError(f"chat template: {error}") from None
    return list(tokenizer.tokenize(render(tokenizer, messages, True)))


def read_prompts(path: str | Path, tokenizer: Any, *, chat: bool = False,
                 max_prompt_tokens: int | None = None, on_error: str = "fail",
                 report: Callable[[str], None] | None = None) -> list[Prompt]:
    """The prompts of ``path`` in order; malformed lines skipped or fatal by ``on_error``.

    ``max_prompt_tokens``: longer prompts are malformed (they leave no room to generate).
    ``report`` receives the skip messages (default: stderr).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    bad = BadRecords("generate", on_error, **({"write": report} if report else {}))
    prompts: list[Prompt] = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                parsed = parse_line(raw)
                if parsed is None:
                    continue
                source, record_id = parsed
                tokens = encode_prompt(tokenizer, source, chat)
                if not tokens:
                    raise RecordError("the prompt has no tokens")
                if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
                    raise RecordError(f"the prompt has {len(tokens)} tokens; at most "
                                      f"{max_prompt_tokens} leave room to generate")
            except RecordError as error:
                bad.add(f"{path}:{number}", str(error))
                continue
            prompts.append(Prompt(len(prompts), number, source, tokens, record_id))
    bad.finish()
    return prompts


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write ``records`` as JSON lines, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
