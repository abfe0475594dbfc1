"""Prompt files: formats, chat rendering, malformed lines by line number; stop handling;
atomic output."""

import json
import os

import pytest

from megatron_patch.data.bad_records import DataError
from megatron_patch.generation.prompts import read_prompts, write_jsonl
from megatron_patch.generation.stopping import StopChecker
from megatron_patch.tokenizer import HFTokenizer
from tests.conversion.tiny_models import save_tokenizer

GOOD_AND_BAD = [
    "t5 t7 t9",                                                         # 1 text
    json.dumps({"prompt": "t20 t21", "id": 7}),                          # 2 prompt + id
    "",                                                                  # 3 blank: ignored
    json.dumps({"messages": [{"role": "user", "content": "t30 t31"}]}),  # 4 chat
    json.dumps({"prompt": 5}),                                           # 5 bad
    "{bad json",                                                         # 6 bad
    json.dumps({"messages": [{"role": "user"}]}),                        # 7 bad
    json.dumps({"text": "t1"}),                                          # 8 bad
    " ".join(["t3"] * 30),                                               # 9 too long
    "t40",                                                               # 10 text
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(path, 240)
    return HFTokenizer(str(path))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_formats_and_malformed_lines_are_reported_with_line_numbers(tmp_path, tokenizer):
    path = _write(tmp_path / "prompts.jsonl", GOOD_AND_BAD)
    with open(path, "ab") as handle:
        handle.write(b"\xff\xfe bad utf-8\n")  # line 11
    reported = []
    prompts = read_prompts(path, tokenizer, max_prompt_tokens=20, on_error="skip",
                           report=reported.append)
    assert [p.line for p in prompts] == [1, 2, 4, 10]
    assert [p.index for p in prompts] == [0, 1, 2, 3]
    assert prompts[1].id == 7 and prompts[1].source == "t20 t21"
    assert prompts[0].tokens == tokenizer.tokenize("t5 t7 t9")
    assert prompts[2].tokens == tokenizer.apply_chat_template(
        [{"role": "user", "content": "t30 t31"}], add_generation_prompt=True)
    assert [line.split(": ")[1].rsplit(":", 1)[1] for line in reported] == \
        ["5", "6", "7", "8", "9", "11"]
    assert "'prompt' is not text" in reported[0] and "bad JSON" in reported[1]
    assert "turn 1" in reported[2] and "no 'prompt' or 'messages'" in reported[3]
    assert "30 tokens; at most 20" in reported[4] and "UTF-8" in reported[5]


def test_a_malformed_line_is_fatal_by_default(tmp_path, tokenizer):
    path = _write(tmp_path / "prompts.jsonl", GOOD_AND_BAD)
    with pytest.raises(DataError, match=r"prompts.jsonl:5: 'prompt' is not text"):
        read_prompts(path, tokenizer)


def test_chat_flag_renders_text_prompts_as_a_user_turn(tmp_path, tokenizer):
    path = _write(tmp_path / "prompts.txt", ["t5 t6"])
    [prompt] = read_prompts(path, tokenizer, chat=True)
    assert prompt.tokens == tokenizer.apply_chat_template([{"role": "user", "content": "t5 t6"}],
                                                          add_generation_prompt=True)


class _Words:
    """Token i is the word ``w<i>``."""

    def detokenize(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_stop_at_eos_and_stop_strings():
    checker = StopChecker(_Words(), eos_ids=[2], stop_strings=["w7 w8"])
    assert checker.stop_length([5, 6, 2, 9], 0) == 3
    assert checker.stop_length([5, 7, 8, 9], 0) == 3  # the token completing "w7 w8" counts
    assert checker.stop_length([5, 7, 8, 9], 2) == 3  # found while checking new tokens
    assert checker.stop_length([2, 5, 6], 1) is None  # tokens before ``checked`` were checked
    assert checker.stop_length([5, 6, 9], 0) is None
    stopped = checker.complete([5, 7, 8], stopped=True)
    assert (stopped.text, stopped.tokens, stopped.finish_reason) == ("w5 ", [5, 7, 8], "stop")
    assert checker.complete([5, 6, 2], stopped=True).text == "w5 w6"
    assert checker.complete([5, 6], stopped=False).finish_reason == "length"


def test_output_is_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [{"a": 1}, {"b": "é"}])
    assert out.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_jsonl(out, [{"c": 3}])
    assert out.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
