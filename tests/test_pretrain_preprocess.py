"""``megatron-patch preprocess`` / ``merge-datasets``: Megatron indexed datasets from raw text."""

import json
from itertools import islice

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_patch import cli
from megatron_patch.data.bad_records import DataError
from megatron_patch.data.merge_datasets import merge_datasets
from megatron_patch.data.pretrain_preprocess import preprocess_file
from megatron_patch.data.sentences import split_sentences
from megatron_patch.tokenizer import TINY_TOKENIZER_DIR, build_tokenizer

# Worker pools fork a process that has imported torch (as Megatron-LM's preprocessing does).
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
CORPUS = TINY_TOKENIZER_DIR.parent / "tiny_corpus.jsonl"
DOCS = ["The first document.\nIt has two lines.", "Ünïcode: naïve café, 中文, 😀.",
        "def f(x):\n    return x + 1\n", "", "Short.", "Last one?  Yes! Really."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("TinyTokenizer", None)


def _jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


def _documents(prefix):
    """Token arrays of each document (sequences of a document concatenated)."""
    dataset = IndexedDataset(str(prefix))
    bounds = dataset.document_indices
    return [numpy.concatenate([dataset[i] for i in range(start, end)] or [numpy.array([], int)])
            for start, end in zip(bounds[:-1], bounds[1:])]


def _bytes(prefix):
    return (prefix.with_name(prefix.name + ".bin").read_bytes(),
            prefix.with_name(prefix.name + ".idx").read_bytes())


def test_round_trip_decodes_to_the_input(tmp_path, tokenizer):
    out = preprocess_file(_jsonl(tmp_path / "in.jsonl", DOCS), tmp_path / "out", tokenizer,
                          append_eod=True, progress=False)
    assert out == {"text": tmp_path / "out_text_document"}
    documents = _documents(out["text"])
    assert len(documents) == len(DOCS)  # the empty document is kept, as Megatron-LM does
    for text, ids in zip(DOCS, documents):
        if text:
            assert ids[-1] == tokenizer.eod
            assert tokenizer.detokenize(ids[:-1].tolist()) == text
        else:
            assert len(ids) == 0  # no EOD for an empty document
    assert IndexedDataset(str(out["text"])).index.dtype == numpy.uint16


def test_bytes_follow_megatron_builder_semantics(tmp_path, tokenizer):
    """Same bytes as Megatron-LM's preprocess_data.py: one add_document per line, EOD appended."""
    docs = [json.loads(line)["text"] for line in islice(CORPUS.open(encoding="utf-8"), 20)]
    out = preprocess_file(_jsonl(tmp_path / "in.jsonl", docs), tmp_path / "ours", tokenizer,
                          append_eod=True, progress=False)["text"]
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=numpy.uint16)
    for doc in docs:
        ids = tokenizer.tokenize(doc) + [tokenizer.eod]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert _bytes(out) == _bytes(tmp_path / "ref")


def test_two_workers_match_one(tmp_path, tokenizer):
    docs = [json.loads(line)["text"] for line in islice(CORPUS.open(encoding="utf-8"), 120)]
    source = _jsonl(tmp_path / "in.jsonl", docs)
    one = preprocess_file(source, tmp_path / "one", tokenizer, append_eod=True, progress=False)
    two = preprocess_file(source, tmp_path / "two", tokenizer, append_eod=True, workers=2,
                          chunk_size=7, progress=False)
    assert _bytes(one["text"]) == _bytes(two["text"])


def _malformed(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good one"}\n'
                     b'{"text": "broken\n'
                     b'{"title": "no text key"}\n'
                     b'{"text": "bad \xff byte"}\n'
                     b'\n'
                     b'{"text": "good two"}\n'
                     b'[1, 2]\n'
                     b'{"text": 42}\n')
    return path


def test_malformed_lines_skip(tmp_path, tokenizer, capsys):
    source = _malformed(tmp_path)
    code = cli.main(["preprocess", "--input", str(source), "--output-prefix",
                     str(tmp_path / "out"), "--tokenizer-type", "TinyTokenizer",
                     "--on-error", "skip"])
    assert code == 0
    err = capsys.readouterr().err
    for line, reason in [(2, "bad JSON"), (3, "missing key 'text'"), (4, "not valid UTF-8"),
                         (7, "not a JSON object"), (8, "key 'text' is not text")]:
        assert f"{source}:{line}: {reason}" in err
    assert f"{source}:5" not in err and f"{source}:1:" not in err  # blank and good lines
    texts = [tokenizer.detokenize(d.tolist()) for d in _documents(tmp_path / "out_text_document")]
    assert texts == ["good one", "good two"]


def test_malformed_lines_fail_atomically(tmp_path, capsys):
    source = _malformed(tmp_path)
    args = ["preprocess", "--input", str(source), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-type", "TinyTokenizer", "--workers", "2", "--chunk-size", "1"]
    assert cli.main(args) == 1
    assert f"{source}:2: bad JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no outputs, no temps
    with pytest.raises(DataError, match=f"{source}:2"):
        preprocess_file(source, tmp_path / "out", build_tokenizer("ByteTokenizer", None),
                        progress=False)


def test_no_documents_is_an_error(tmp_path, tokenizer):
    source = tmp_path / "chat.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"no documents to write \(1 malformed"):
        preprocess_file(source, tmp_path / "out", tokenizer, on_error="skip", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


def test_failed_run_leaves_the_previous_dataset_intact(tmp_path, tokenizer):
    good = preprocess_file(_jsonl(tmp_path / "in.jsonl", DOCS), tmp_path / "out", tokenizer,
                           progress=False)["text"]
    before = _bytes(good)
    with pytest.raises(DataError):
        preprocess_file(_malformed(tmp_path), tmp_path / "out", tokenizer, progress=False)
    assert _bytes(good) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sentence_split(tmp_path, tokenizer):
    text = "First sentence. Second one!\n\nA new paragraph? \"Quoted.\" End"
    assert split_sentences(text) == ["First sentence.", " Second one!", "\n\nA new paragraph?",
                                     " \"Quoted.\"", " End"]
    assert "".join(split_sentences("  lead. trail.  ")) == "  lead. trail.  "
    out = preprocess_file(_jsonl(tmp_path / "in.jsonl", [text, "One only."]), tmp_path / "s",
                          tokenizer, split_sentences=True, append_eod=True, progress=False)
    prefix = out["text"]
    assert prefix.name == "s_text_sentence"
    dataset = IndexedDataset(str(prefix))
    assert dataset.document_indices.tolist() == [0, 5, 6]
    sentences = [dataset[i].tolist() for i in range(len(dataset))]
    assert [s[-1] == tokenizer.eod for s in sentences] == [False] * 4 + [True, True]
    assert tokenizer.detokenize(sum(sentences[:5], [])[:-1]) == text


def test_several_json_keys(tmp_path, tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "body one", "title": "T1"}\n{"text": "body two", "title": "T2"}\n')
    out = preprocess_file(path, tmp_path / "k", tokenizer, ["text", "title"], progress=False)
    assert set(out) == {"text", "title"}
    titles = [tokenizer.detokenize(d.tolist()) for d in _documents(out["title"])]
    assert titles == ["T1", "T2"]


def test_directory_input(tmp_path, tokenizer):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _jsonl(data / "a.jsonl", ["a1", "a2"])
    (data / "b.txt").write_text("whole file\nis one document\n", encoding="utf-8")
    _jsonl(data / "sub" / "c.jsonl", ["c1"])
    _jsonl(data / ".hidden.jsonl", ["ignored"])
    (data / "notes.md").write_text("ignored too")
    out = preprocess_file(data, tmp_path / "dir", tokenizer, progress=False)["text"]
    texts = [tokenizer.detokenize(d.tolist()) for d in _documents(out)]
    assert texts == ["a1", "a2", "whole file\nis one document\n", "c1"]


def test_parquet_input_matches_jsonl(tmp_path, tokenizer):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pyarrow.table({"text": DOCS}), tmp_path / "in.parquet")
    from_parquet = preprocess_file(tmp_path / "in.parquet", tmp_path / "pq", tokenizer,
                                   append_eod=True, progress=False)["text"]
    from_jsonl = preprocess_file(_jsonl(tmp_path / "in.jsonl", DOCS), tmp_path / "js",
                                 tokenizer, append_eod=True, progress=False)["text"]
    assert _bytes(from_parquet) == _bytes(from_jsonl)


def test_merge_equals_one_shot(tmp_path, tokenizer, capsys):
    docs = [json.loads(line)["text"] for line in islice(CORPUS.open(encoding="utf-8"), 30)]
    shards = tmp_path / "shards"
    for index, part in enumerate([docs[:13], docs[13:]]):
        preprocess_file(_jsonl(tmp_path / f"part{index}.jsonl", part), shards / f"s{index}",
                        tokenizer, append_eod=True, progress=False)
    whole = preprocess_file(_jsonl(tmp_path / "all.jsonl", docs), tmp_path / "whole", tokenizer,
                            append_eod=True, progress=False)["text"]
    merged = merge_datasets([shards / "s0_text_document", shards / "s1_text_document"],
                            tmp_path / "merged")
    assert _bytes(merged) == _bytes(whole)
    assert cli.main(["merge-datasets", "--input", str(shards), "--output-prefix",
                     str(tmp_path / "from_dir")]) == 0
    assert _bytes(tmp_path / "from_dir") == _bytes(whole)
    assert cli.main(["merge-datasets", "--input", str(tmp_path / "missing"),
                     "--output-prefix", str(tmp_path / "x")]) == 1
    assert "missing.bin is missing" in capsys.readouterr().err


def test_output_feeds_megatron_gpt_dataset(tmp_path, tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    docs = [json.loads(line)["text"] for line in islice(CORPUS.open(encoding="utf-8"), 10)]
    prefix = preprocess_file(_jsonl(tmp_path / "in.jsonl", docs), tmp_path / "g", tokenizer,
                             append_eod=True, progress=False)["text"]
    config = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([str(prefix)], None),
                              split="1,0,0", tokenizer=tokenizer, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False)
    indexed = IndexedDataset(str(prefix))
    dataset = GPTDataset(indexed, str(prefix), numpy.arange(len(indexed), dtype=numpy.int32),
                         8, Split.train, config)
    sample = dataset[0]
    assert sample["tokens"].shape == (64,) and int(sample["tokens"].max()) < tokenizer.vocab_size
