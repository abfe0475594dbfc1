"""The demo LLaVA of ``examples/llava/run_mcore_llava.sh``: random weights, shipped tokenizer.

    python -m megatron_patch.models.llava.demo OUT_DIR

A CLIP tower (28x28 images in 7x7 patches, 2 layers, hidden 64) and a Llama (2 layers, hidden
128, GQA 4/2) over the shipped 2048-token tokenizer plus one ``<image>`` token (id 2048), built
from the transformers config classes (nothing is downloaded).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from megatron_patch.tokenizer import TINY_TOKENIZER_DIR

IMAGE_TOKEN = 2048


def save_demo_llava(out: str | Path, seed: int = 0) -> Path:
    """Write the demo model (fp32 safetensors, config, tokenizer) into ``out``."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=7, projection_dim=32),
        text_config=transformers.LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=IMAGE_TOKEN + 1, max_position_embeddings=256,
            rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=None, pad_token_id=0),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-1)
    model = transformers.LlavaForConditionalGeneration(config)
    out = Path(out)
    model.save_pretrained(out)
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy2(file, out / file.name)
    return out


if __name__ == "__main__":
    save_demo_llava(sys.argv[1])
