"""Tokenizers: every registered type builds, round-trips text and names missing files clearly."""

import base64
import json
import pickle

import pytest
from transformers import AutoTokenizer

from megatron_patch.tokenizer import (
    TINY_TOKENIZER_DIR,
    TOKENIZERS,
    HFTokenizer,
    TikTokenizer,
    build_tokenizer,
)

TEXT = "Hello, world!\n\n  def f(x):\treturn x * 2  # émoji 😀 and CJK 中文"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model trained on a few lines."""
    sentencepiece = pytest.importorskip("sentencepiece")
    directory = tmp_path_factory.mktemp("sp")
    lines = ["hello world", "the quick brown fox jumps over the lazy dog",
             "tokenizers split text into pieces", "megatron trains large language models",
             "hello again world of text"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"),
        vocab_size=64, model_type="bpe", character_coverage=1.0, pad_id=3,
        minloglevel=2)
    return directory / "tokenizer.model"


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    """A tiny Qwen-style ``.tiktoken`` file: all 256 bytes, then a few merges."""
    tokens = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"llo", b"hello", b" w", b" wor"]
    path = tmp_path_factory.mktemp("tiktoken") / "qwen.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n"
                            for rank, t in enumerate(tokens)))
    return path


def test_registry_is_the_documented_set():
    assert set(TOKENIZERS) == {"HFTokenizer", "SentencePieceTokenizer", "TikTokenizer",
                               "ByteTokenizer", "TinyTokenizer"}
    with pytest.raises(ValueError, match="unknown tokenizer type 'GPT2'"):
        build_tokenizer("GPT2", None)


def test_shipped_tiny_tokenizer():
    tokenizer = build_tokenizer("TinyTokenizer", None)
    assert tokenizer.vocab_size == 2048
    assert tokenizer.eod == tokenizer.pad == 0
    ids = tokenizer.tokenize(TEXT)
    assert all(0 <= i < 2048 for i in ids) and tokenizer.detokenize(ids) == TEXT
    assert tokenizer.tokenize("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    json.dumps(tokenizer.unique_identifiers)  # Megatron serialises it into cache keys
    # Plain transformers loads the directory offline, chat template included.
    hf = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR, local_files_only=True)
    assert len(hf) == 2048 and hf.eos_token == hf.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in hf.chat_template


def test_chat_template_is_chatml():
    tokenizer = build_tokenizer("TinyTokenizer", None)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(MESSAGES)
    assert ids == tokenizer.tokenize(text.removesuffix("<|im_start|>assistant\n"))
    masked = tokenizer.apply_chat_template(MESSAGES, return_dict=True,
                                           return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(masked["input_ids"], masked["assistant_masks"]) if m]
    assert tokenizer.detokenize(answer) == "Hello.<|im_end|>"


def test_hf_tokenizer_from_a_directory_and_extra_vocab():
    tokenizer = build_tokenizer("HFTokenizer", str(TINY_TOKENIZER_DIR), extra_vocab_size=16)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == 2048 + 16
    assert tokenizer.tokenize(TEXT) == build_tokenizer("TinyTokenizer", None).tokenize(TEXT)
    assert tokenizer.unique_identifiers["tokenizer_path"] == str(TINY_TOKENIZER_DIR)


def test_byte_tokenizer():
    tokenizer = build_tokenizer("ByteTokenizer", None, extra_vocab_size=3)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (260, 256, 256)
    ids = tokenizer.tokenize(TEXT)
    assert ids == list(TEXT.encode()) and tokenizer.detokenize(ids + [256]) == TEXT


def test_sentencepiece_tokenizer(sp_model):
    from_file = build_tokenizer("SentencePieceTokenizer", str(sp_model))
    from_dir = build_tokenizer("SentencePieceTokenizer", str(sp_model.parent), 2)
    text = "hello world the quick fox"
    assert from_file.tokenize(text) == from_dir.tokenize(text)
    assert from_file.detokenize(from_file.tokenize(text)) == text
    assert (from_file.vocab_size, from_dir.vocab_size) == (64, 66)
    assert (from_file.eod, from_file.pad) == (2, 3)  # </s>, and the pad id we trained with


def test_tiktoken_tokenizer(tiktoken_file):
    tokenizer = build_tokenizer("TikTokenizer", str(tiktoken_file.parent))
    assert isinstance(tokenizer, TikTokenizer)
    assert tokenizer.eod == tokenizer.pad == 262  # the first id after the 262 ranks
    assert tokenizer.vocab_size == 262 + 3 + 205  # Qwen's specials: endoftext, im_*, extras
    assert tokenizer.tokenize("hello world") == [259, 260, *b"orld"]  # no " wo" to reach " wor"
    assert tokenizer.tokenize("<|im_start|>hi<|im_end|>") == [263, *b"hi", 264]
    assert tokenizer.detokenize(tokenizer.tokenize(TEXT)) == TEXT
    assert build_tokenizer("TikTokenizer", str(tiktoken_file), 5).vocab_size == 475


def test_tokenizers_pickle_as_their_arguments(sp_model, tiktoken_file):
    for kind, path in [("TinyTokenizer", None), ("ByteTokenizer", None),
                       ("SentencePieceTokenizer", str(sp_model)),
                       ("TikTokenizer", str(tiktoken_file))]:
        tokenizer = build_tokenizer(kind, path, 1)
        clone = pickle.loads(pickle.dumps(tokenizer))
        assert clone.tokenize("hello world") == tokenizer.tokenize("hello world")
        assert clone.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize("kind, expected", [("HFTokenizer", "tokenizer.json"),
                                            ("SentencePieceTokenizer", "tokenizer.model"),
                                            ("TikTokenizer", "qwen.tiktoken")])
def test_missing_files_name_the_path(tmp_path, kind, expected):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_tokenizer(kind, str(missing))
    with pytest.raises(FileNotFoundError, match=expected) as empty_dir:
        build_tokenizer(kind, str(tmp_path))
    assert str(tmp_path) in str(empty_dir.value)
    with pytest.raises(ValueError, match="needs a path"):
        build_tokenizer(kind, None)


def test_mismatched_files_are_reported(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_text("aGk= 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match=f"{bad}:2"):
        build_tokenizer("TikTokenizer", str(bad))
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match=str(tmp_path)):
        build_tokenizer("HFTokenizer", str(tmp_path))
