"""SFT data: chat rendering and assistant masks, packing, pre-tokenized sets, packed attention."""

import json
import re

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split
from torch.utils.data import default_collate

from megatron_patch import cli
from megatron_patch.data.bad_records import DataError
from megatron_patch.data.packing import build_row
from megatron_patch.data.sft import SFTDataset, SFTDatasetConfig
from megatron_patch.data.sft_encoder import encode_messages
from megatron_patch.data.sft_format import record_messages
from megatron_patch.data.sft_preprocess import preprocess_sft
from megatron_patch.data.sft_sources import load_sft_samples
from megatron_patch.models.common.packed_seq import segment_ids
from megatron_patch.tokenizer import TINY_TOKENIZER_DIR, build_tokenizer
from megatron_patch.training.sft_data import loss_weights, packed_batch

CHAT = TINY_TOKENIZER_DIR.parent / "tiny_chat.jsonl"
MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "4 * 3 = 12.\nDone."},
]
ANSWERS = ["2 + 2 = 4.<|im_end|>", "4 * 3 = 12.\nDone.<|im_end|>"]


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer("TinyTokenizer", None)


def _masked_runs(tokenizer, ids, mask) -> list[str]:
    """Decoded text of each contiguous run of masked tokens."""
    runs, current = [], []
    for token, flag in zip(list(ids) + [None], list(mask) + [0]):
        if flag:
            current.append(int(token))
        elif current:
            runs.append(tokenizer.detokenize(current))
            current = []
    return runs


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def test_loss_mask_is_exactly_the_assistant_turns(tiny):
    ids, mask = encode_messages(tiny, MULTI_TURN)
    assert list(ids) == tiny.apply_chat_template(MULTI_TURN)  # the template's own tokens
    assert _masked_runs(tiny, ids, mask) == ANSWERS
    # The shipped template marks its answers with {% generation %}: same masks for every chat.
    for line in CHAT.read_text().splitlines()[:300]:
        messages = json.loads(line)["messages"]
        ids, mask = encode_messages(tiny, messages)
        marked = tiny.apply_chat_template(messages, return_dict=True,
                                          return_assistant_tokens_mask=True)
        assert list(ids) == marked["input_ids"] and list(mask) == marked["assistant_masks"]


def test_template_without_generation_markers(tmp_path):
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "<|endoftext|>{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}"
        "<|im_end|>\n\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant:\n"
        "{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    tokenizer = build_tokenizer("HFTokenizer", str(tmp_path))
    ids, mask = encode_messages(tokenizer, MULTI_TURN)
    assert list(ids) == tokenizer.apply_chat_template(MULTI_TURN) and ids[0] == 0
    assert _masked_runs(tokenizer, ids, mask) == ANSWERS  # trailing blank line excluded


def test_tokenizers_without_a_template_use_chatml():
    tokenizer = build_tokenizer("ByteTokenizer", None)
    ids, mask = encode_messages(tokenizer, MULTI_TURN)
    assert tokenizer.detokenize(list(ids)).startswith("<|im_start|>system\nYou are terse.")
    assert _masked_runs(tokenizer, ids, mask) == ANSWERS


def test_alpaca_and_sharegpt_records(tiny):
    alpaca = record_messages({"instruction": "Add.", "input": "1 2", "output": "3",
                              "system": "Be exact."})
    assert alpaca == [{"role": "system", "content": "Be exact."},
                      {"role": "user", "content": "Add.\n\n1 2"},
                      {"role": "assistant", "content": "3"}]
    assert record_messages({"instruction": "Hi.", "output": "Hello."})[0]["content"] == "Hi."
    sharegpt = record_messages({"conversations": [{"from": "human", "value": "Hi"},
                                                  {"from": "gpt", "value": "Hello."}]})
    assert sharegpt == [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}]
    ids, mask = encode_messages(tiny, alpaca)
    assert tiny.detokenize(list(ids)) == ("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>"
                                          "user\nAdd.\n\n1 2<|im_end|>\n<|im_start|>assistant\n"
                                          "3<|im_end|>\n")
    assert _masked_runs(tiny, ids, mask) == ["3<|im_end|>"]


def _malformed(tmp_path):
    long_answer = " ".join(["word"] * 80)
    return _jsonl(tmp_path / "bad.jsonl", [
        {"messages": MULTI_TURN},                                          # 1 good
        '{"messages": [',                                                  # 2 bad JSON
        {"instruction": "no output"},                                      # 3 missing key
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "  "}]},           # 4 empty answer
        {"conversations": [{"from": "robot", "value": "x"}]},             # 5 unknown role
        "",                                                                # 6 blank: ignored
        {"instruction": "Say a lot.", "output": long_answer},              # 7 too long to pack
        {"instruction": "Add 1 and 2.", "output": "3"},                   # 8 good
    ])


def test_bad_samples_are_reported_with_line_numbers(tmp_path, tiny, capsys):
    source = _malformed(tmp_path)
    samples = load_sft_samples(source, tiny, 64, packing=True, on_error="skip")
    assert len(samples) == 2
    out = capsys.readouterr().out
    reported = dict(re.findall(rf"skipped {re.escape(str(source))}:(\d+): (.*)", out))
    expected = {"2": "bad JSON", "3": "missing key 'output'",
                "4": "empty assistant turn (turn 2)",
                "5": "'conversations' turn 1: unknown role 'robot'",
                "7": "96 tokens, longer than --seq-length 64"}
    assert sorted(reported) == sorted(expected)
    assert all(reported[line].startswith(reason) for line, reason in expected.items()), reported
    assert "2 samples, 5 skipped" in out
    padded = load_sft_samples(source, tiny, 64, on_error="skip")  # truncated, not skipped
    assert len(padded) == 3 and "1 truncated to --seq-length 64" in capsys.readouterr().out
    with pytest.raises(DataError, match=f"{source}:2: bad JSON"):
        load_sft_samples(source, tiny, 64)


def _dataset(tmp_path, tiny, records, seq_length, packing, train_on_prompt=False):
    source = _jsonl(tmp_path / "chat.jsonl", records)
    config = SFTDatasetConfig(random_seed=7, sequence_length=seq_length, tokenizer=tiny,
                              blend=([str(source)], None), split="100,0,0", packing=packing,
                              train_on_prompt=train_on_prompt)
    samples = SFTDataset.build_low_level_dataset(str(source), config)
    indices = numpy.arange(len(samples), dtype=numpy.int32)
    return samples, SFTDataset(samples, str(source), indices, None, Split.train, config)


def _chats(count):
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}." * (i % 3 + 1)}]}
            for i in range(count)]


def test_packing_rows(tmp_path, tiny):
    seq = 64
    samples, dataset = _dataset(tmp_path, tiny, _chats(40), seq, packing=True)
    assert len(dataset) == dataset.num_rows < len(samples)  # several samples per row
    seen = []
    for index in range(len(dataset)):
        row = dataset[index]
        bounds = row["cu_seqlens"][row["cu_seqlens"] < seq].tolist() + [seq]
        assert bounds[0] == 0 and row["max_seqlen"] == max(numpy.diff(bounds))
        documents = segment_ids(row["cu_seqlens"], seq)
        for number, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            assert (documents[start:end] == number).all()
            assert row["position_ids"][start:end].tolist() == list(range(end - start))
            tokens = row["tokens"][start:end].numpy()
            match = [i for i in range(len(samples)) if numpy.array_equal(samples[i][0], tokens)]
            if match:  # a whole sample, never split; its loss mask is its shifted answer mask
                seen += match
                ids, mask = samples[match[0]]
                assert row["labels"][start:end - 1].tolist() == ids[1:].tolist()
                assert row["loss_mask"][start:end - 1].tolist() == mask[1:].tolist()
                assert row["loss_mask"][end - 1] == 0
            else:  # the padding segment closes the row
                assert end == seq and (row["tokens"][start:] == tiny.pad).all()
                assert not row["loss_mask"][start:].any()
    assert sorted(seen) == list(range(len(samples)))


def test_micro_batch_of_packed_rows(tmp_path, tiny):
    seq = 64
    _, dataset = _dataset(tmp_path, tiny, _chats(40), seq, packing=True)
    rows = [dataset[i] for i in range(3)]
    batch, params = packed_batch(default_collate(rows), seq)
    assert batch["tokens"].shape == (1, 3 * seq) and params.qkv_format == "thd"
    expected = [0]
    for offset, row in enumerate(rows):
        cu = row["cu_seqlens"][row["cu_seqlens"] < seq].tolist()[1:] + [seq]
        expected += [offset * seq + b for b in cu]
    assert params.cu_seqlens_q.tolist() == expected and params.tokens_per_sample == seq
    assert params.max_seqlen_q == max(int(row["max_seqlen"]) for row in rows)
    assert torch.equal(batch["tokens"][0], torch.cat([row["tokens"] for row in rows]))
    weights = loss_weights(batch, per_sequence=True)[0]
    sequences = segment_ids(params.cu_seqlens_q, 3 * seq)
    answered = 0
    for sequence in sequences.unique():  # each sequence with answer tokens weighs 1 in all
        in_sequence = sequences == sequence
        has_answer = bool(batch["loss_mask"][0][in_sequence].any())
        assert weights[in_sequence].sum() == pytest.approx(float(has_answer))
        answered += has_answer
    assert answered >= 3 and weights.sum() == pytest.approx(answered)
    assert torch.equal(loss_weights(batch, per_sequence=False), batch["loss_mask"])


def test_padded_rows_truncate_and_train_on_prompt(tmp_path, tiny):
    records = [{"messages": MULTI_TURN}]
    samples, dataset = _dataset(tmp_path, tiny, records, 32, packing=False)
    ids, mask = samples[0]
    row = dataset[0]
    assert "cu_seqlens" not in row and len(ids) > 32 and mask[1:33].any()
    assert row["tokens"].tolist() == ids[:32].tolist()
    assert row["labels"].tolist() == ids[1:33].tolist()  # the truncated row's last target
    assert row["loss_mask"].tolist() == mask[1:33].tolist()
    with pytest.raises(DataError, match="no assistant token within the first --seq-length 16"):
        _dataset(tmp_path, tiny, records, 16, packing=False)
    _, prompt = _dataset(tmp_path, tiny, records, 128, packing=False, train_on_prompt=True)
    row = prompt[0]
    assert row["loss_mask"].tolist() == [1.0] * (len(ids) - 1) + [0.0] * (129 - len(ids))
    assert (row["tokens"][len(ids):] == tiny.pad).all()


def test_pretokenized_round_trip(tmp_path, tiny, capsys):
    source = _malformed(tmp_path)
    prefix = tmp_path / "sft"
    assert cli.main(["preprocess-sft", "--input", str(source), "--output-prefix", str(prefix),
                     "--tokenizer-type", "TinyTokenizer", "--on-error", "skip"]) == 0
    assert f"{source}:2: bad JSON" in capsys.readouterr().err
    ids = IndexedDataset(f"{prefix}_input_ids_document")
    mask = IndexedDataset(f"{prefix}_loss_mask_document")
    assert ids.index.dtype == numpy.uint16 and mask.index.dtype == numpy.uint8
    raw = load_sft_samples(source, tiny, 1024, on_error="skip")
    assert len(ids) == len(raw) == 3
    for i in range(3):
        assert numpy.array_equal(ids[i], raw[i][0]) and numpy.array_equal(mask[i], raw[i][1])
    packed = load_sft_samples(prefix, tiny, 64, packing=True, on_error="skip")
    assert len(packed) == 2 and f"{prefix} document 1: " in capsys.readouterr().out
    # A vocabulary beyond uint16 stores int32 token ids (nothing truncated, no sentinels).
    wide = tmp_path / "wide"
    preprocess_sft(source, wide, build_tokenizer("ByteTokenizer", None, extra_vocab_size=70_000),
                   on_error="skip", progress=False)
    assert IndexedDataset(f"{wide}_input_ids_document").index.dtype == numpy.int32


# -- packed attention against Hugging Face, document by document ------------------------------

@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    import transformers

    path = tmp_path_factory.mktemp("hf-llama")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, vocab_size=300,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # norms near 1, so a swapped mapping would show
            param.normal_(1.0 if param.ndim == 1 else 0.0, 0.1 if param.ndim == 1 else 0.15)
    model.save_pretrained(path)
    return path, model.eval()


def test_packed_batch_matches_documents_run_alone(tmp_path, hf_llama):
    from megatron_patch.conversion import build_model_from_hf_config
    from megatron_patch.conversion.layout import single_process_group

    path, reference = hf_llama
    generator = torch.Generator().manual_seed(1)
    seq = 24
    documents = [[torch.randint(3, 300, (n,), generator=generator) for n in lengths]
                 for lengths in ([5, 9, 3], [7, 13], [24])]  # rows: padded, packed, full
    rows = [build_row([(d.numpy(), numpy.ones(len(d), numpy.uint8)) for d in docs], seq, 0,
                      train_on_prompt=False, packed=True) for docs in documents]
    firsts = [docs[0] for docs in documents]  # one sample per row, right-padded, not packed
    padded_tokens = torch.stack([torch.nn.functional.pad(d, (0, seq - len(d))) for d in firsts])
    with single_process_group(tmp_path), torch.no_grad():
        model = build_model_from_hf_config(path).eval()
        batch, params = packed_batch(default_collate(rows), seq)  # micro-batch of 3 rows
        packed = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)[0]
        padded = model(padded_tokens, torch.arange(seq).expand(3, seq), None)
    with torch.no_grad():
        for row, docs in enumerate(documents):
            offset = row * seq
            for doc in docs:
                expected = reference(doc[None]).logits[0]
                got = packed[offset:offset + len(doc), :expected.shape[-1]]
                assert (got - expected).abs().max() <= 1e-4, (row, len(doc))
                offset += len(doc)
            got = padded[row, :len(firsts[row]), :expected.shape[-1]]
            assert (got - reference(firsts[row][None]).logits[0]).abs().max() <= 1e-4
