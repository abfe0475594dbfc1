"""Qwen2-VL data against transformers: dynamic-resolution patches equal to
Qwen2VLImageProcessor's, M-RoPE positions equal to the model's get_rope_index, image spans,
assistant-only loss, packing, and errors that name the sample."""

import json
import shutil

import numpy
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_patch.data.bad_records import DataError
from megatron_patch.data.qwen2_vl import Qwen2VLSFTDataset, VisionTokens
from megatron_patch.data.qwen2_vl_images import ImagePatcher, image_patcher
from megatron_patch.models.qwen2_vl import demo
from megatron_patch.tokenizer import TinyTokenizer
from tests.vlm.test_multimodal_data import (
    ASSETS,
    _chat,
    _write,
    bad_records,
    check_bad_sample_is_named,
)

SIZED = ["red_circle_56x32.png", "green_square_24x48.png", "blue_triangle_48x48.png",
         "yellow_circle_40x24.png", "red_square.png"]
DEMO = {"patch_size": 4, "min_pixels": 256, "max_pixels": 1600}
TOKENS = VisionTokens(demo.VISION_START, demo.IMAGE_PAD, demo.VISION_END)


def _rgba(tmp_path):
    """A half-transparent RGBA image (composited onto white, as transformers does)."""
    pixels = numpy.zeros((20, 36, 4), dtype=numpy.uint8)
    pixels[..., 0], pixels[..., 3] = 200, numpy.arange(36, dtype=numpy.uint8) * 7
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)
    return path


@pytest.mark.parametrize("settings", [DEMO, {}], ids=["demo", "default"])
def test_patches_equal_transformers_processor(tmp_path, settings):
    paths = [ASSETS / "images" / name for name in SIZED] + [_rgba(tmp_path)]
    reference = Qwen2VLImageProcessorPil(**settings)(
        images=[Image.open(p) for p in paths], return_tensors="pt")
    patcher = ImagePatcher(**settings)
    ours = [patcher.load(p, "sample x") for p in paths]
    grids = torch.tensor([grid for _, grid in ours])
    assert torch.equal(grids, reference["image_grid_thw"])
    assert len(set(map(tuple, grids.tolist()))) >= 3  # dynamic resolution: sizes differ
    pixels = torch.cat([p for p, _ in ours])
    assert pixels.shape == reference["pixel_values"].shape
    torch.testing.assert_close(pixels, reference["pixel_values"], rtol=0, atol=1e-5)
    for path, (_, grid) in zip(paths, ours):  # sizing without decoding agrees
        assert patcher.grid(*Image.open(path).size) == grid


def test_settings_from_preprocessor_config(tmp_path):
    hf = demo.demo_config().to_dict()
    Qwen2VLImageProcessorPil(patch_size=4, min_pixels=256, max_pixels=1600).save_pretrained(
        tmp_path / "new")
    assert image_patcher(hf, [None, tmp_path / "new"]) == ImagePatcher(**DEMO)
    assert image_patcher(hf, [tmp_path / "new"], max_pixels=4096).max_pixels == 4096
    (tmp_path / "old").mkdir()  # the keys of the published Qwen2-VL checkpoints
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 64, "max_pixels": 999, "patch_size": 4, "merge_size": 2}))
    assert image_patcher(hf, [tmp_path / "old"]).max_pixels == 999
    assert image_patcher(hf, [tmp_path]) == ImagePatcher(patch_size=4)  # no file: defaults
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    with pytest.raises(ValueError, match=r"old/preprocessor_config.json: patch_size=14 but"):
        image_patcher(hf, [tmp_path / "old"])


def _dataset(path, packing=False, seq_length=160, on_error="fail"):
    tokenizer = TinyTokenizer()
    return Qwen2VLSFTDataset(path, tokenizer, patcher=ImagePatcher(**DEMO), tokens=TOKENS,
                             seq_length=seq_length, pad_id=tokenizer.eod, packing=packing,
                             on_error=on_error)


def test_image_spans_and_assistant_only_loss():
    tokenizer = TinyTokenizer()
    data = _dataset(ASSETS / "tiny_vlm_chat.jsonl")
    records = [json.loads(line) for line in (ASSETS / "tiny_vlm_chat.jsonl").open()]
    assert len(data) == len(records)
    for record, sample in zip(records, data.samples):
        assert len(sample.grids) == len(record["images"])
        starts = numpy.flatnonzero(sample.ids == TOKENS.start)
        ends = numpy.flatnonzero(sample.ids == TOKENS.end)
        for start, end, (t, h, w) in zip(starts, ends, sample.grids, strict=True):
            assert end - start - 1 == t * h * w // 4
            assert (sample.ids[start + 1:end] == TOKENS.image).all()
        assert not sample.mask[sample.ids >= TOKENS.start].any()
        trained = tokenizer.detokenize(sample.ids[sample.mask.astype(bool)].tolist())
        for turn in record["conversations"]:
            if turn["from"] == "gpt":
                assert turn["value"] in trained
            else:
                assert turn["value"].replace("<image>", "").strip() not in trained
    item = data[0]
    n = len(data.samples[0].ids)
    assert torch.equal(item["labels"][: n - 1], item["tokens"][1:n])
    assert item["loss_mask"][n - 1:].sum() == 0
    assert item["pixel_values"].shape == (64, 96) and item["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_positions_equal_transformers_get_rope_index():
    import transformers

    model = transformers.Qwen2_5_VLModel(demo.demo_config())
    data = _dataset(ASSETS / "tiny_vlm_chat.jsonl")
    rows = [12, 14, 15, 16]  # one image of each size, then two images in one conversation
    batch = data.collate([data[k] for k in rows])
    valid = torch.zeros_like(batch["tokens"])
    for row, k in enumerate(rows):
        valid[row, :len(data.samples[k].ids)] = 1
    reference, _ = model.get_rope_index(
        batch["tokens"], mm_token_type_ids=(batch["tokens"] == TOKENS.image).int(),
        image_grid_thw=batch["image_grid_thw"], attention_mask=valid)
    assert batch["position_ids"].shape == (3, 4, 160)
    real = valid.bool().expand(3, -1, -1)
    assert torch.equal(batch["position_ids"][real], reference[real])
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()


def test_packing_keeps_every_sample_whole():
    plain, packed = _dataset(ASSETS / "tiny_vlm_chat.jsonl"), \
        _dataset(ASSETS / "tiny_vlm_chat.jsonl", packing=True)
    assert len(packed) < len(plain)
    for index, row in enumerate(packed.rows):
        item = packed[index]
        bounds = item["cu_seqlens"][:len(row) + 1].tolist()
        grids, pixels = [], []
        for k, start, end in zip(row, bounds, bounds[1:]):
            alone = plain[k]
            n = end - start
            for key in ("tokens", "labels", "loss_mask"):
                assert torch.equal(item[key][start:end], alone[key][:n]), key
            assert torch.equal(item["position_ids"][:, start:end], alone["position_ids"][:, :n])
            grids.append(alone["image_grid_thw"])
            pixels.append(alone["pixel_values"])
        assert torch.equal(item["image_grid_thw"], torch.cat(grids))
        assert torch.equal(item["pixel_values"], torch.cat(pixels))


BAD = bad_records("blue_triangle_48x48.png", 160)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_is_named(tmp_path, case, capsys):
    check_bad_sample_is_named(tmp_path, capsys, *BAD[case], _dataset)


def test_image_replaced_after_loading_is_named(tmp_path):
    path = _write(tmp_path, [{"id": "moved", "images": ["images/red_square.png"],
                              "conversations": _chat()}])
    data = _dataset(path)
    shutil.copy(tmp_path / "images" / "blue_triangle_48x48.png",
                tmp_path / "images" / "red_square.png")
    with pytest.raises(DataError, match=r"sample 'moved' \(line 1\): image .* changed size"):
        data[0]
    (tmp_path / "images" / "red_square.png").unlink()
    with pytest.raises(DataError, match=r"sample 'moved' \(line 1\): image .* not found"):
        data[0]


def test_image_tokens_in_the_text_are_refused(tmp_path):
    path = _write(tmp_path, [{"id": "t1", "images": ["images/red_square.png"],
                              "conversations": _chat()}])
    tokenizer = TinyTokenizer()  # its <|im_start|> (id 1) taken for the image token
    with pytest.raises(DataError, match=r"sample 't1' \(line 1\): the text holds image tokens"):
        Qwen2VLSFTDataset(path, tokenizer, patcher=ImagePatcher(**DEMO),
                          tokens=VisionTokens(TOKENS.start, 1, TOKENS.end), seq_length=160,
                          pad_id=tokenizer.eod)
