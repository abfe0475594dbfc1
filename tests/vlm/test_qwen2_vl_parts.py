"""Qwen2-VL / Qwen2.5-VL pieces against transformers' own functions (single process): patch
positions of the 2-D rope, per-image attention bounds, Qwen2.5-VL's window grouping, the M-RoPE
position ids, and the config mapping (both config layouts, refused fields named)."""

import pytest
import torch
import transformers
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from megatron_patch.mapping.config import UnsupportedConfigError
from megatron_patch.models.qwen2_vl import hf_to_megatron, tied_embeddings, vision
from megatron_patch.models.qwen2_vl.rope_index import rope_index
from megatron_patch.models.qwen2_vl.tower import frame_bounds, patch_positions, window_order
from tests.vlm.tiny_vlms import IMAGE_TOKEN, qwen_vl_config

# (t, h, w) patch grids: square and not, windows that divide the grid and ones that do not,
# several frames, one merged patch
GRIDS = torch.tensor([[1, 8, 12], [1, 6, 10], [2, 4, 4], [1, 16, 8], [1, 2, 2], [3, 10, 6]])


def test_patch_positions_and_frames_match_transformers():
    assert torch.equal(patch_positions(GRIDS, 2), get_vision_position_ids(GRIDS, 2))
    assert torch.equal(frame_bounds(GRIDS), get_vision_cu_seqlens(GRIDS).long())


@pytest.mark.parametrize("merge, window_size, patch", [(2, 16, 4), (2, 112, 14), (1, 12, 4)])
def test_window_order_matches_transformers(merge, window_size, patch):
    order, bounds = window_order(GRIDS, merge, window_size // merge // patch)
    expected_order, expected_bounds = get_vision_window_index(GRIDS, merge, window_size, patch)
    assert torch.equal(order, expected_order)
    assert torch.equal(bounds, expected_bounds.long())


def test_rope_index_matches_transformers():
    """Two rows: one image; two images of other sizes with text between; text-only rows are
    covered by a third row."""
    config = qwen_vl_config("qwen2_5_vl")
    model = transformers.Qwen2_5_VLModel(config)
    grids = torch.tensor([[1, 6, 8], [1, 10, 12], [1, 4, 4]])
    counts = (grids.prod(-1) // 4).tolist()
    generator = torch.Generator().manual_seed(0)
    length = 4 + sum(counts) + 5

    def row(images: list[int]) -> torch.Tensor:
        parts = []
        for count in images:
            parts += [torch.randint(0, 200, (2,), generator=generator),
                      torch.full((count,), IMAGE_TOKEN)]
        used = sum(len(p) for p in parts)
        return torch.cat([*parts, torch.randint(0, 200, (length - used,), generator=generator)])

    ids = torch.stack([row(counts[:1]), row(counts[1:]), row([])])
    expected, _ = model.get_rope_index(ids, (ids == IMAGE_TOKEN).int(), image_grid_thw=grids)
    assert torch.equal(rope_index(ids, grids, IMAGE_TOKEN, 2), expected)
    with pytest.raises(ValueError, match="image_grid_thw"):
        rope_index(ids, grids[:2], IMAGE_TOKEN, 2)
    with pytest.raises(ValueError, match="consecutive image tokens"):
        rope_index(ids, grids[[0, 2, 1]], IMAGE_TOKEN, 2)


def _flat(config: dict) -> dict:
    """A pre-transformers-5 config.json: language model at the top level, rope_scaling."""
    text = dict(config.pop("text_config"))
    rope = text.pop("rope_parameters")
    flat = {**text, **config, "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    flat["vision_config"] = {**flat["vision_config"],
                             "in_chans": flat["vision_config"].pop("in_channels")}
    flat["model_type"] = config["model_type"]
    return flat


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_both_config_layouts_map_alike(kind):
    nested = qwen_vl_config(kind, tie=True).to_dict()
    args = hf_to_megatron(nested)
    assert args["position_embedding_type"] == "mrope" and args["mrope_section"] == [2, 3, 3]
    assert args["hidden_size"] == 64 and args["add_qkv_bias"]
    assert not args["untie_embeddings_and_output_weights"] and tied_embeddings(nested)
    flat = _flat(qwen_vl_config(kind, tie=True).to_dict())
    assert hf_to_megatron(flat) == args
    assert vision(flat) == vision(nested)


@pytest.mark.parametrize("change, field", [
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
     "mrope_section"),
    (lambda c: c["vision_config"].update(out_hidden_size=32), "hidden_size"),
    (lambda c: c["vision_config"].update(patch_size=[4, 4]), "patch"),
    (lambda c: c["vision_config"].update(hidden_act="relu"), "hidden_act"),
    (lambda c: c["vision_config"].update(window_size=4), "window_size"),
    (lambda c: c.update(model_type="qwen3_vl"), "model_type"),
])
def test_unsupported_config_names_the_field(change, field):
    config = qwen_vl_config("qwen2_5_vl").to_dict()
    change(config)
    with pytest.raises(UnsupportedConfigError, match=field):
        hf_to_megatron(config)
