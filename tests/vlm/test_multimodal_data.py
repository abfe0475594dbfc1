"""Multimodal SFT data: <image> placeholders, assistant-only loss, Pillow images, and errors
that name the sample."""

import json
import shutil

import pytest
import torch

from megatron_patch.data.bad_records import DataError
from megatron_patch.data.multimodal import MultimodalSFTDataset, load_image
from megatron_patch.tokenizer import TinyTokenizer

ASSETS = __import__("pathlib").Path(__file__).resolve().parents[2] / "megatron_patch" / \
    "assets" / "tiny_vlm"
IMAGE_TOKEN = 2047  # a token of the tiny tokenizer that no text encodes to here


def _dataset(path, on_error="fail", seq_length=96, image_tokens=16):
    tokenizer = TinyTokenizer()
    return MultimodalSFTDataset(path, tokenizer, image_token_id=IMAGE_TOKEN,
                                image_tokens=image_tokens, image_size=28,
                                seq_length=seq_length, pad_id=tokenizer.eod, on_error=on_error)


def test_shipped_data_masks_only_assistant_turns():
    tokenizer = TinyTokenizer()
    data = _dataset(ASSETS / "tiny_vlm_chat.jsonl")
    records = [json.loads(line) for line in (ASSETS / "tiny_vlm_chat.jsonl").open()]
    assert len(data) == len(records)
    for record, sample in zip(records, data.samples):
        images = len(record["images"])
        assert int((sample.ids == IMAGE_TOKEN).sum()) == images
        trained = tokenizer.detokenize(sample.ids[sample.mask.astype(bool)].tolist())
        for turn in record["conversations"]:
            if turn["from"] == "gpt":
                assert turn["value"] in trained
            else:
                assert turn["value"].replace("<image>", "").strip() not in trained
    item = data[0]
    assert item["images"].shape == (data.max_images, 3, 28, 28)
    assert int(item["num_images"]) == 1
    # labels are the next token; the loss covers the next token when it is the assistant's
    n = len(data.samples[0].ids)
    assert torch.equal(item["labels"][: n - 1], item["tokens"][1:n])
    assert item["loss_mask"][n - 1:].sum() == 0


def test_image_is_normalised_rgb():
    pixels = load_image(ASSETS / "images" / "red_square.png", 28, "sample x")
    assert pixels.shape == (3, 28, 28)
    centre = pixels[:, 14, 14]
    assert centre[0] > 1.0 and centre[1] < 0 and centre[2] < 0  # red after CLIP normalisation


def _write(tmp_path, records):
    shutil.copytree(ASSETS / "images", tmp_path / "images")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _chat(question="<image>\nWhat is it?"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "A shape."}]


def bad_records(long_image: str, seq_length: int) -> dict:
    """case -> (bad record, the error it must raise) for a dataset of ``seq_length``."""
    return {
        "missing": ({"id": "m1", "images": ["images/nope.png"], "conversations": _chat()},
                    r"sample 'm1' \(line 2\): image .*nope.png not found"),
        "corrupt": ({"id": "c1", "images": ["broken.png"], "conversations": _chat()},
                    r"sample 'c1' \(line 2\): image .*broken.png is not a readable image"),
        "count": ({"id": "n1", "images": ["images/red_square.png"],
                   "conversations": _chat("<image><image> two?")},
                  r"sample 'n1' \(line 2\): 2 <image> placeholders but 1 images"),
        "too-long": ({"id": "l1", "images": [f"images/{long_image}"] * 6,
                      "conversations": _chat("<image>" * 6)},
                     rf"sample 'l1' \(line 2\): .* more than --seq-length {seq_length}"),
    }


def check_bad_sample_is_named(tmp_path, capsys, record, message, dataset) -> None:
    """A bad record after a good one fails naming it, or is skipped and listed."""
    good = {"id": "ok", "images": ["images/red_square.png"], "conversations": _chat()}
    path = _write(tmp_path, [good, record])
    with pytest.raises(DataError, match=message):
        dataset(path)
    data = dataset(path, on_error="skip")
    assert [s.sample_id for s in data.samples] == ["sample 'ok' (line 1)"]
    assert "skipped sample" in capsys.readouterr().err


BAD = bad_records("red_square.png", 96)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_is_named(tmp_path, case, capsys):
    check_bad_sample_is_named(tmp_path, capsys, *BAD[case], _dataset)


def test_image_removed_after_loading_is_named(tmp_path):
    path = _write(tmp_path, [{"id": "gone", "images": ["images/red_square.png"],
                              "conversations": _chat()}])
    data = _dataset(path)
    (tmp_path / "images" / "red_square.png").unlink()
    with pytest.raises(DataError, match=r"sample 'gone' \(line 1\): image .* not found"):
        data[0]
