"""SFT records -> token ids plus an assistant mask: exactly the tokens the model must generate.

A conversation is rendered with the tokenizer's chat template (``apply_chat_template``);
tokenizers without one use ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``). The span of
assistant turn ``k`` is found by rendering prefixes: the conversation up to ``k`` with the
generation prompt is where the answer starts, the conversation through ``k`` is where it ends,
trailing whitespace excluded. So the span is the answer and its end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ...), whatever the template. A template that does not
render earlier turns as a prefix of the whole conversation is reported for that record.

Hugging Face tokenizers tokenize the whole rendered text once, as ``apply_chat_template`` does,
and a token is an assistant token when its characters overlap an assistant span; other
tokenizers tokenize the prompt and answer pieces separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
import numpy

from megatron_patch.data.encoder import RecordEncoder, RecordError, parse_record
from megatron_patch.data.sft_format import Message, record_messages
from megatron_patch.tokenizer import Tokenizer

Span = tuple[int, int]  # [start, end) characters of the rendered conversation
SFT_OUTPUT_KEYS = ("input_ids", "loss_mask")  # dataset keys of a pre-tokenized SFT set


def _chatml(messages: list[Message], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    """The conversation as text: the tokenizer's chat template, else ChatML."""
    if getattr(tokenizer, "chat_template", None) is None:
        return _chatml(messages, add_generation_prompt)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError) as error:
        raise RecordError(f"chat template: {error}") from None


def assistant_spans(tokenizer: Tokenizer, messages: list[Message]) -> tuple[str, list[Span]]:
    """The rendered conversation and the character span of each assistant turn."""
    text = render(tokenizer, messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], True)
        turn = render(tokenizer, messages[:k + 1], False)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise RecordError(f"the chat template does not render turn {k + 1} as a "
                              "continuation of the turns before it; its answer span is unknown")
        spans.append((len(prompt), len(prompt) + len(turn[len(prompt):].rstrip())))
    return text, spans


def tokenize_spans(tokenizer: Tokenizer, text: str,
                   spans: list[Span]) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Token ids of ``text`` (int32) and a uint8 mask of the tokens inside ``spans``."""
    if hasattr(tokenizer, "encode_with_offsets"):
        ids, offsets = tokenizer.encode_with_offsets(text)
        bounds = numpy.asarray(offsets, dtype=numpy.int64).reshape(-1, 2)
        starts, ends = bounds[:, 0], numpy.maximum(bounds[:, 1], bounds[:, 0] + 1)
        mask = numpy.zeros(len(ids), dtype=bool)
        for start, end in spans:
            mask |= (starts < end) & (ends > start)
        return numpy.asarray(ids, dtype=numpy.int32), mask.astype(numpy.uint8)
    pieces, position = [], 0
    for start, end in spans:
        pieces += [(text[position:start], 0), (text[start:end], 1)]
        position = end
    pieces.append((text[position:], 0))
    ids, mask = [], []
    for piece, flag in pieces:
        piece_ids = tokenizer.tokenize(piece) if piece else []
        ids += piece_ids
        mask += [flag] * len(piece_ids)
    return numpy.asarray(ids, dtype=numpy.int32), numpy.asarray(mask, dtype=numpy.uint8)


def encode_messages(tokenizer: Tokenizer,
                    messages: list[Message]) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Token ids and assistant mask of one conversation."""
    ids, mask = tokenize_spans(tokenizer, *assistant_spans(tokenizer, messages))
    if not mask.any():
        raise RecordError("no assistant tokens after tokenization")
    return ids, mask


@dataclass(frozen=True)
class SFTEncoder(RecordEncoder):
    """Encodes SFT records (see :mod:`.sft_format`) into ``input_ids`` and ``loss_mask``."""

    tokenizer: Tokenizer

    def encode(self, kind: str, payload: object) -> dict | None:
        """``{key: (values, [length])}`` of one record (``None`` for a blank line)."""
        record = parse_record(kind, payload)
        if record is None:
            return None
        ids, mask = encode_messages(self.tokenizer, record_messages(record))
        return {"input_ids": (ids, [len(ids)]), "loss_mask": (mask, [len(mask)])}
