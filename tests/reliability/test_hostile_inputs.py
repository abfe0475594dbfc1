"""Hostile data and tokenizer files: our clear errors or a result, never a crash, hang or blow-up.

Fuzzed with hypothesis (example counts kept small for CI): the JSONL/JSON/TXT record reader with
the pretraining encoder, the SFT reader (formats, chat templates, packing rules), and the
tokenizer loaders (tiktoken ranks, SentencePiece models, Hugging Face tokenizer files). There is
no preference (chosen/rejected) reader in the repository yet, so none is fuzzed. A 2 GiB single
line is read with bounded memory.
"""

import base64
import contextlib
import json
import random
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_patch.data.bad_records import DataError
from megatron_patch.data.encoder import Encoder
from megatron_patch.data.readers import read_records
from megatron_patch.data.sft_encoder import SFTEncoder
from megatron_patch.data.sft_sources import load_sft_samples
from megatron_patch.tokenizer import (
    TINY_TOKENIZER_DIR,
    ByteTokenizer,
    TinyTokenizer,
    build_tokenizer,
)

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=30),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOKENIZERS = {"byte": ByteTokenizer(), "tiny": TinyTokenizer()}
# Inputs that broke parsers or tokenizers before: deep nesting (RecursionError), a 5000-digit
# number (ValueError), lone UTF-16 surrogates (no tokenizer encodes them), NUL, a BOM, bad UTF-8.
NASTY_LINES = [b"[" * 100_000, b'{"text": ' + b"1" * 5000 + b"}", b'{"text": "a\\ud800b"}',
               b'{"text": "\\udfff"}', b'{"messages": [{"role": "user", "content": "\\ud83d"}]}',
               b'{"text": "\x00"}', b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "\xff\xfe"}',
               b'{"text": NaN}', b"{}", b"[]", b"null", b'"text"', b"\r", b"\x00" * 64]

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)
role = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", ""]) | json_value
turn = st.fixed_dictionaries({}, optional={"role": role, "content": st.text(max_size=40)
                                           | json_value, "from": role, "value": st.text()})
sft_record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | json_value},
                          optional={"system": st.text(max_size=20) | json_value}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=4) | json_value}),
    st.fixed_dictionaries({}, optional={key: st.text(max_size=30) | json_value
                                        for key in ("instruction", "input", "output", "system")}),
    json_value)
pretrain_record = st.dictionaries(st.sampled_from(["text", "other"]) | st.text(max_size=4),
                                  json_value | st.text(), max_size=3)


def as_lines(records: st.SearchStrategy) -> st.SearchStrategy:
    """JSON lines of ``records``, mixed with random bytes and known-nasty lines."""
    line = st.one_of(records.map(lambda r: json.dumps(r).encode()),
                     records.map(lambda r: json.dumps(r, ensure_ascii=False).encode(
                         "utf-8", "surrogatepass")),
                     st.binary(max_size=80), st.sampled_from(NASTY_LINES))
    return st.lists(line, max_size=8).map(b"\n".join)


@contextlib.contextmanager
def written(data: bytes, suffix: str) -> Iterator[Path]:
    """``data`` in a temporary file (hypothesis examples cannot use ``tmp_path``)."""
    with tempfile.TemporaryDirectory(prefix="hostile") as directory:
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(data)
        yield path


@FUZZ
@given(data=as_lines(pretrain_record), suffix=st.sampled_from([".jsonl", ".json", ".txt"]),
       tokenizer=st.sampled_from(sorted(TOKENIZERS)))
def test_pretrain_reader_and_encoder(data, suffix, tokenizer):
    encoder = Encoder(TOKENIZERS[tokenizer], ("text",), split_sentences=True, append_eod=True)
    with written(data, suffix) as path:
        results = encoder.encode_chunk(list(read_records([path], ["text"])))
    for location, result in results:
        assert location.startswith(str(path))
        assert result is None or isinstance(result, (str, dict)), result


@FUZZ
@given(data=as_lines(sft_record), tokenizer=st.sampled_from(sorted(TOKENIZERS)),
       packing=st.booleans())
def test_sft_reader(data, tokenizer, packing):
    with written(data, ".jsonl") as path:
        records = list(read_records([path], ["messages"]))
        try:
            samples = load_sft_samples(path, TOKENIZERS[tokenizer], 64, packing=packing,
                                       on_error="skip")
        except DataError as error:
            assert "no trainable samples" in str(error)
        else:
            assert len(samples) > 0
    for location, result in SFTEncoder(TOKENIZERS[tokenizer]).encode_chunk(records):
        assert result is None or isinstance(result, (str, dict)), (location, result)


@FUZZ
@given(extra=st.lists(st.tuples(st.binary(min_size=1, max_size=4), st.integers(-3, 400)),
                      max_size=40),
       drop=st.sets(st.integers(0, 255), max_size=2), junk=st.binary(max_size=20),
       text=st.text(max_size=40))
def test_tiktoken_loader(extra, drop, junk, text):
    lines = [(bytes([b]), b) for b in range(256) if b not in drop] + extra
    body = b"\n".join(base64.b64encode(token) + b" " + str(rank).encode()
                      for token, rank in lines) + b"\n" + junk
    with written(body, ".tiktoken") as path:
        try:
            tokenizer = build_tokenizer("TikTokenizer", str(path))
        except ValueError as error:
            assert str(path) in str(error)
            return
    tokenizer.detokenize(tokenizer.tokenize(text))  # tiktoken panics would abort the process


@pytest.fixture(scope="module")
def sp_model_bytes(tmp_path_factory) -> bytes:
    sentencepiece = pytest.importorskip("sentencepiece")
    directory = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world", "the quick brown fox", "pieces of text"] * 20),
        model_prefix=str(directory / "tokenizer"), vocab_size=40, model_type="bpe",
        character_coverage=1.0, minloglevel=2)
    return (directory / "tokenizer.model").read_bytes()


def _mutate(data: bytes, seed: int, flips: int) -> bytes:
    rng = random.Random(seed)
    mutated = bytearray(data)
    for _ in range(flips):
        action = rng.random()
        position = rng.randrange(len(mutated))
        if action < 0.6:
            mutated[position] = rng.randrange(256)
        elif action < 0.8:
            del mutated[position:position + rng.randrange(1, 16)]
        else:
            mutated[position:position] = bytes(rng.randrange(256) for _ in range(4))
    return bytes(mutated)


@FUZZ
@given(seed=st.integers(0, 2**32), flips=st.integers(1, 8), text=st.text(max_size=40))
def test_sentencepiece_loader(sp_model_bytes, seed, flips, text):
    with written(_mutate(sp_model_bytes, seed, flips), ".model") as path:
        try:
            tokenizer = build_tokenizer("SentencePieceTokenizer", str(path))
        except ValueError as error:
            assert str(path) in str(error)
            return
    tokenizer.detokenize(tokenizer.tokenize(text))


@FUZZ
@given(seed=st.integers(0, 2**32), flips=st.integers(1, 6),
       target=st.sampled_from(["tokenizer.json", "tokenizer_config.json"]),
       text=st.text(max_size=40))
def test_hf_tokenizer_loader(seed, flips, target, text):
    with tempfile.TemporaryDirectory(prefix="hostile-hf") as directory:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            data = (TINY_TOKENIZER_DIR / name).read_bytes()
            mutated = _mutate(data, seed, flips) if name == target else data
            (Path(directory) / name).write_bytes(mutated)
        try:
            tokenizer = build_tokenizer("HFTokenizer", directory)
        except (ValueError, FileNotFoundError) as error:
            assert directory in str(error)
            return
    tokenizer.detokenize(tokenizer.tokenize(text))


def test_two_gib_line_is_skipped_with_bounded_memory(tmp_path):
    """A 2 GiB line (sparse file) is reported and skipped in 1 MiB reads; the next line is read."""
    path = tmp_path / "huge.jsonl"
    size = 2 * 2**30
    with open(path, "wb") as handle:
        handle.write(b'{"text": "')
        handle.truncate(size)  # a sparse file: NUL bytes up to 2 GiB, no newline
        handle.seek(size)
        handle.write(b'"}\n{"text": "next"}\n')
    tracemalloc.start()
    start = time.monotonic()
    records = list(read_records([path], ["text"], max_record_bytes=2**20))
    seconds = time.monotonic() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [(location, kind) for location, kind, _ in records] == [
        (f"{path}:1", "error"), (f"{path}:2", "json")]
    assert records[0][2] == f"{size + 3} bytes, longer than the {2**20} bytes a record may have"
    assert peak < 8 * 2**20, peak
    encoded = Encoder(ByteTokenizer(), ("text",)).encode_chunk(records)
    assert encoded[0] == (f"{path}:1", records[0][2])
    assert encoded[1][1]["text"][0] == list(b"next")
    print(f"2 GiB line skipped in {seconds:.1f} s, peak Python memory {peak / 2**20:.1f} MiB")
