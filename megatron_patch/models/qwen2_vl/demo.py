"""The demo Qwen2.5-VL of ``examples/qwen2_5_vl/run_mcore_qwen2_5_vl.sh``: random weights.

    python -m megatron_patch.models.qwen2_vl.demo OUT_DIR

A Qwen2.5-VL vision tower (4x4-pixel patches merged 2x2, 2 layers of hidden 64: one in 16-pixel
windows, one full) and a Qwen2 language model (2 layers, hidden 128, GQA 4/2, M-RoPE) over the
shipped 2048-token tokenizer plus ``<|vision_start|>`` (2048), ``<|image_pad|>`` (2049),
``<|vision_end|>`` (2050) and ``<|video_pad|>`` (2051), built from the transformers config
classes (nothing is downloaded). Its ``preprocessor_config.json`` keeps images between 256 and
1600 pixels: a 32x32 image becomes 8x8 patches, 16 image tokens.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from megatron_patch.tokenizer import TINY_TOKENIZER_DIR

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = 2048, 2049, 2050, 2051
PATCH, MIN_PIXELS, MAX_PIXELS = 4, 256, 1600


def demo_config():
    """The demo's ``Qwen2_5_VLConfig``."""
    import transformers

    return transformers.Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                       "patch_size": PATCH, "temporal_patch_size": 2, "spatial_merge_size": 2,
                       "window_size": 16, "fullatt_block_indexes": [1],
                       "out_hidden_size": 128, "tokens_per_second": 2},
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "vocab_size": VIDEO_PAD + 1, "max_position_embeddings": 512,
                     "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [4, 6, 6]},
                     "eos_token_id": 0, "bos_token_id": None, "pad_token_id": 0},
        vision_start_token_id=VISION_START, image_token_id=IMAGE_PAD,
        vision_end_token_id=VISION_END, video_token_id=VIDEO_PAD, tie_word_embeddings=False)


def save_demo_qwen2_5_vl(out: str | Path, seed: int = 0) -> Path:
    """Write the demo model (fp32 safetensors, config, image processor settings, tokenizer)
    into ``out``."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(demo_config())
    out = Path(out)
    model.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=PATCH, min_pixels=MIN_PIXELS,
                             max_pixels=MAX_PIXELS).save_pretrained(out)
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy2(file, out / file.name)
    return out


if __name__ == "__main__":
    save_demo_qwen2_5_vl(sys.argv[1])
