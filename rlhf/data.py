"""Preference and prompt data: JSONL records -> token ids -> padded micro-batch rows.

Preference records (reward model, DPO):

* ``{"prompt": str, "chosen": str, "rejected": str}``: plain text; each answer is followed by
  the end-of-document token;
* chat form: ``prompt`` a list of messages and ``chosen``/``rejected`` an answer string or a
  list of assistant messages, or ``chosen``/``rejected`` whole conversations (``messages``-
  style lists sharing every turn but the last). Rendered with the tokenizer's chat template
  (ChatML without one, as SFT does); the answer is the rendered text after the generation prompt.

Prompt records (GRPO): ``{"prompt": str | messages, ...}``; the whole record is handed to the
reward function. Records that are malformed or longer than ``--seq-length`` are skipped and
reported (``--on-error skip``) or stop the run (``fail``), naming the file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from megatron_patch.data.bad_records import BadRecords, DataError
from megatron_patch.data.encoder import RecordError, parse_record
from megatron_patch.data.readers import input_files, read_records
from megatron_patch.data.sft_encoder import render
from megatron_patch.data.sft_format import Message

Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen answer, rejected answer


@dataclass(frozen=True)
class PromptRecord:
    """One GRPO prompt: its token ids, its text and the record it came from."""

    ids: list[int]
    text: str
    record: dict


def _messages(value: object, what: str) -> list[Message]:
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise RecordError(f"{what!r} is not text or a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _chat_texts(tokenizer, record: dict) -> tuple[str, str, str]:
    """Prompt, chosen and rejected texts of a chat-form record, rendered."""
    if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt")
        answers = []
        for key in ("chosen", "rejected"):
            value = record[key]
            turns = [{"role": "assistant", "content": value}] if isinstance(value, str) \
                else _messages(value, key)
            answers.append(prompt + turns)
    else:
        answers = [_messages(record[key], key) for key in ("chosen", "rejected")]
        prompt = answers[0][:-1]
        if answers[1][:-1] != prompt or not prompt:
            raise RecordError("'chosen' and 'rejected' must share every turn but the last")
    if any(a[-1]["role"] != "assistant" for a in answers):
        raise RecordError("the last turn of 'chosen' and 'rejected' must be the assistant's")
    prompt_text = render(tokenizer, prompt, True)
    texts = []
    for conversation in answers:
        full = render(tokenizer, conversation, False)
        if not full.startswith(prompt_text):
            raise RecordError("the chat template does not render the answer after the prompt")
        texts.append(full[len(prompt_text):].rstrip())
    return prompt_text, texts[0], texts[1]


def encode_pair(tokenizer, record: dict) -> Pair:
    """Token ids of a preference record's prompt and its two answers."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError(f"missing key {key!r}")
    if all(isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected")):
        end = [tokenizer.eod]
        return (tokenizer.tokenize(record["prompt"]), tokenizer.tokenize(record["chosen"]) + end,
                tokenizer.tokenize(record["rejected"]) + end)
    prompt, chosen, rejected = _chat_texts(tokenizer, record)
    return tokenizer.tokenize(prompt), tokenizer.tokenize(chosen), tokenizer.tokenize(rejected)


def encode_prompt(tokenizer, record: dict) -> PromptRecord:
    """A GRPO prompt record: text prompts as they are, message lists with the chat template."""
    if "prompt" not in record:
        raise RecordError("missing key 'prompt'")
    value = record["prompt"]
    text = value if isinstance(value, str) else render(tokenizer, _messages(value, "prompt"), True)
    return PromptRecord(tokenizer.tokenize(text), text, record)


def _read(path: str | Path, on_error: str, name: str, encode, fits) -> list:
    bad = BadRecords(name, on_error)
    items = []
    for location, kind, payload in read_records(input_files(path), []):
        try:
            record = parse_record(kind, payload)
            if record is None:
                continue
            item = encode(record)
            if not fits(item):
                raise RecordError("longer than --seq-length")
            items.append(item)
        except RecordError as error:
            bad.add(location, str(error))
    bad.finish()
    if not items:
        raise DataError(f"{path}: no usable {name} records")
    return items


def read_pairs(path: str | Path, tokenizer, seq_length: int, on_error: str) -> list[Pair]:
    """The preference pairs of ``path`` (JSONL/JSON/parquet file or directory)."""
    def fits(pair: Pair) -> bool:
        return all(a and len(pair[0]) + len(a) <= seq_length for a in pair[1:]) and bool(pair[0])

    return _read(path, on_error, "preference data", lambda r: encode_pair(tokenizer, r), fits)


def read_prompts(path: str | Path, tokenizer, max_prompt_length: int,
                 on_error: str) -> list[PromptRecord]:
    """The prompts of ``path`` (each at most ``max_prompt_length`` tokens)."""
    return _read(path, on_error, "prompt data", lambda r: encode_prompt(tokenizer, r),
                 lambda p: 0 < len(p.ids) <= max_prompt_length)


def sequence_rows(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows ``prompt + answer``: tokens, next-token labels, answer mask, positions.

    ``loss_mask[r, t]`` is 1 where ``labels[r, t]`` (the token after position t) is an answer
    token; ``last[r]`` is the position of the row's last real token.
    """
    rows = len(prompts)
    tokens = numpy.full((rows, seq_length + 1), pad_id, dtype=numpy.int64)
    mask = numpy.zeros((rows, seq_length), dtype=numpy.float32)
    last = numpy.zeros(rows, dtype=numpy.int64)
    for r, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        length = len(prompt) + len(answer)
        if length > seq_length:
            raise ValueError(f"row {r}: {length} tokens exceed --seq-length {seq_length}")
        tokens[r, :length] = list(prompt) + list(answer)
        mask[r, len(prompt) - 1:length - 1] = 1
        last[r] = length - 1
    tokens = torch.from_numpy(tokens)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.from_numpy(mask), "last": torch.from_numpy(last),
            "position_ids": torch.arange(seq_length).expand(rows, -1).contiguous()}


class PairRows(torch.utils.data.Dataset):
    """Preference pairs as rows: row ``2i`` is pair i's chosen answer, ``2i + 1`` its rejected.

    Pairs are visited in a fresh seeded permutation per epoch; ``num_rows`` (a multiple of two)
    covers as many epochs as training needs.
    """

    def __init__(self, pairs: list[Pair], num_rows: int, seq_length: int, pad_id: int,
                 seed: int) -> None:
        self.pairs, self.seq_length, self.pad_id = pairs, seq_length, pad_id
        epochs = -(-num_rows // (2 * len(pairs)))
        rng = numpy.random.default_rng(seed)
        self.order = numpy.concatenate([rng.permutation(len(pairs)) for _ in range(epochs)])
        self.num_rows = num_rows

    def __len__(self) -> int:
        return self.num_rows

    def pair_index(self, row: int) -> int:
        """The pair that row ``row`` belongs to."""
        return int(self.order[row // 2])

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        prompt, chosen, rejected = self.pairs[self.pair_index(row)]
        answer = rejected if row % 2 else chosen
        batch = sequence_rows([prompt], [answer], self.seq_length, self.pad_id)
        return {key: value[0] for key, value in batch.items()}
