"""SFT records as chat messages: OpenAI/ChatML ``messages``, ShareGPT ``conversations``, Alpaca.

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}`` (ShareGPT;
  ``role``/``content`` turns are accepted there too)
* ``{"instruction": "...", "input": "...", "output": "..."}`` (Alpaca; ``input`` optional): one
  user turn ``instruction`` (plus a blank line and ``input`` when given), one assistant turn.

An optional top-level ``"system"`` string becomes the first message unless one is already there.
Every record needs at least one assistant turn, and no assistant turn may be empty.
"""

from __future__ import annotations

from megatron_patch.data.encoder import RecordError

Message = dict[str, str]
SFT_KEYS = ("messages", "conversations", "instruction", "input", "output", "system")
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user",
          "gpt": "assistant"}


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} is not text (got {type(value).__name__})")
    return value


def _turns(turns: object, key: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{key!r} is not a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RecordError(f"{key!r} turn {number} is not an object")
        role_key, content_key = ("from", "value") if "from" in turn else ("role", "content")
        if role_key not in turn or content_key not in turn:
            raise RecordError(f"{key!r} turn {number} lacks {role_key!r} or {content_key!r}")
        role = _text(turn[role_key], f"{key!r} turn {number} {role_key!r}")
        if role not in _ROLES:
            raise RecordError(f"{key!r} turn {number}: unknown role {role!r} "
                              f"(expected one of {', '.join(_ROLES)})")
        content = _text(turn[content_key], f"{key!r} turn {number} {content_key!r}")
        messages.append({"role": _ROLES[role], "content": content})
    return messages


def _alpaca(record: dict) -> list[Message]:
    for key in ("instruction", "output"):
        if key not in record:
            raise RecordError(f"missing key {key!r}")
    prompt = _text(record["instruction"], "'instruction'")
    extra = _text(record.get("input") or "", "'input'")
    if extra:
        prompt = f"{prompt}\n\n{extra}" if prompt else extra
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record["output"], "'output'")}]


def record_messages(record: dict) -> list[Message]:
    """The conversation of one SFT record as ``[{"role", "content"}, ...]``; checks it."""
    if "messages" in record:
        messages = _turns(record["messages"], "messages")
    elif "conversations" in record:
        messages = _turns(record["conversations"], "conversations")
    elif "instruction" in record or "output" in record:
        messages = _alpaca(record)
    else:
        raise RecordError("no 'messages', 'conversations' or 'instruction'/'output' key")
    system = record.get("system")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": _text(system, "'system'")})
    answers = [number for number, m in enumerate(messages, 1) if m["role"] == "assistant"]
    if not answers:
        raise RecordError("no assistant turn")
    for number in answers:
        if not messages[number - 1]["content"].strip():
            raise RecordError(f"empty assistant turn (turn {number})")
    return messages
