"""Turn one input record into token ids per JSON key, the way Megatron-LM's preprocessing does."""

from __future__ import annotations

import json
from dataclasses import dataclass

from megatron_patch.data.readers import has_lone_surrogate, may_hold_surrogate
from megatron_patch.data.sentences import split_sentences
from megatron_patch.tokenizer import Tokenizer

# key -> (token ids of the document, token count of each of its sentences)
Encoded = dict[str, tuple[list[int], list[int]]]


class RecordError(ValueError):
    """A malformed input record (bad JSON or UTF-8, missing or non-text key)."""


def parse_record(kind: str, payload: object) -> dict | None:
    """A record of :mod:`.readers` as a dict (``None`` for a blank JSON line)."""
    if kind == "error":
        raise RecordError(payload)
    if kind == "row":
        data = payload
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RecordError(f"not valid UTF-8 (byte {error.start})") from None
        if kind == "text":
            return {"text": text}
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # also too deep, too many digits
            raise RecordError(f"bad JSON ({type(error).__name__}: {error})") from None
        if may_hold_surrogate(payload) and has_lone_surrogate(data):
            raise RecordError("text holds an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF "
                              "escape), which no tokenizer can encode")
    if not isinstance(data, dict):
        raise RecordError(f"not a JSON object (got {type(data).__name__})")
    return data


class RecordEncoder:
    """Base of the preprocessing encoders: ``encode`` one record, ``encode_chunk`` many."""

    def encode(self, kind: str, payload: object) -> Encoded | None:
        """Values and sequence lengths per dataset key (``None`` for a blank line)."""
        raise NotImplementedError

    def encode_chunk(self, records: list[tuple[str, str, object]]
                     ) -> list[tuple[str, Encoded | str | None]]:
        """``(location, encoded | error message | None)`` for each record, in order."""
        results: list[tuple[str, Encoded | str | None]] = []
        for location, kind, payload in records:
            try:
                results.append((location, self.encode(kind, payload)))
            except RecordError as error:
                results.append((location, str(error)))
        return results


@dataclass(frozen=True)
class Encoder(RecordEncoder):
    """Tokenizes records: each sentence separately, empty ones dropped, EOD after the last."""

    tokenizer: Tokenizer
    json_keys: tuple[str, ...]
    split_sentences: bool = False
    append_eod: bool = False

    def sentences(self, data: dict, key: str) -> list[str]:
        """The text under ``key`` as sentences (a list of strings is taken as already split)."""
        if key not in data:
            raise RecordError(f"missing key {key!r}")
        value = data[key]
        if isinstance(value, str):
            return split_sentences(value) if self.split_sentences else [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise RecordError(f"key {key!r} is not text (got {type(value).__name__})")

    def encode(self, kind: str, payload: object) -> Encoded | None:
        """Token ids and sentence lengths per key (``None`` for a blank line)."""
        data = parse_record(kind, payload)
        if data is None:
            return None
        encoded = {}
        for key in self.json_keys:
            ids: list[int] = []
            lengths: list[int] = []
            for sentence in self.sentences(data, key):
                sentence_ids = self.tokenizer.tokenize(sentence)
                if sentence_ids:
                    ids.extend(sentence_ids)
                    lengths.append(len(sentence_ids))
            if ids and self.append_eod:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            encoded[key] = (ids, lengths)
        return encoded
