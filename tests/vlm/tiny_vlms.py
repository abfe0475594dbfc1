"""Tiny random vision-language models from the transformers config classes (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from megatron_patch.conversion.tiny import init_random_

IMAGE_TOKEN = 251
# CLIP tower of 3 layers on 28x28 images in 7x7 patches (16 patches + class token); features
# from layer -2 (the last layer and post_layernorm are never read); Llama with GQA, untied.
LLAVA = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                      "num_attention_heads": 4, "image_size": 28, "patch_size": 7,
                      "projection_dim": 16},
    "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 252,
                    "max_position_embeddings": 128, "rms_norm_eps": 1e-5},
    "image_token_id": IMAGE_TOKEN,
}


TEXT_CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
VISION_CONFIGS = {"clip": transformers.CLIPVisionConfig, "siglip": transformers.SiglipVisionConfig}


def llava_config(text: str = "llama", text_overrides: dict | None = None,
                 vision: str = "clip", **overrides) -> transformers.LlavaConfig:
    """The tiny LLaVA config with a ``text`` language model and a ``vision`` tower (keys of
    TEXT_CONFIGS, VISION_CONFIGS); ``overrides`` replace top-level fields (e.g. the strategy),
    ``text_overrides`` those of the language model."""
    fields = {**LLAVA, **overrides}
    text_config = TEXT_CONFIGS[text](**{**fields.pop("text_config"), **(text_overrides or {})})
    vision_fields = dict(fields.pop("vision_config"))
    if vision == "siglip":
        vision_fields.pop("projection_dim")
    return transformers.LlavaConfig(vision_config=VISION_CONFIGS[vision](**vision_fields),
                                    text_config=text_config, **fields)


def save_tiny_llava(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny LLaVA (sharded safetensors, fp32) with non-trivial norms and biases."""
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(llava_config(**overrides))
    init_random_(model)
    model.save_pretrained(path, max_shard_size="100KB")
    return Path(path)


# Qwen2-VL / Qwen2.5-VL: 2 ViT layers (hidden 32, 4 heads) over 4x4-pixel patches, merged 2x2
# into the language model's width 64; Qwen2.5-VL windows of 2x2 merged patches (window_size 16
# pixels) in layer 0, full attention in layer 1; 2 Qwen2 layers with GQA and M-RoPE sections
# (2, 3, 3) of the 8 channel pairs.
QWEN_TEXT = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 252,
             "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 0,
             "eos_token_id": 1, "rope_parameters": {"rope_type": "default",
                                                    "mrope_section": [2, 3, 3],
                                                    "rope_theta": 10000.0}}
QWEN_VISION = {
    "qwen2_vl": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 4, "hidden_size": 64,
                 "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2},
    "qwen2_5_vl": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4,
                   "out_hidden_size": 64, "patch_size": 4, "temporal_patch_size": 2,
                   "spatial_merge_size": 2, "window_size": 16, "fullatt_block_indexes": [1]},
}
QWEN_CLASSES = {"qwen2_vl": (transformers.Qwen2VLConfig,
                             transformers.Qwen2VLForConditionalGeneration),
                "qwen2_5_vl": (transformers.Qwen2_5_VLConfig,
                               transformers.Qwen2_5_VLForConditionalGeneration)}


def qwen_vl_config(kind: str = "qwen2_vl", tie: bool = False):
    """The tiny Qwen2-VL (``kind="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) config."""
    config_class = QWEN_CLASSES[kind][0]
    return config_class(text_config=dict(QWEN_TEXT), vision_config=dict(QWEN_VISION[kind]),
                        image_token_id=IMAGE_TOKEN, tie_word_embeddings=tie)


def save_tiny_qwen_vl(path: Path, kind: str = "qwen2_vl", tie: bool = False,
                      seed: int = 0) -> Path:
    """Save a random tiny Qwen2-VL / Qwen2.5-VL (sharded safetensors, fp32)."""
    torch.manual_seed(seed)
    model = QWEN_CLASSES[kind][1](qwen_vl_config(kind, tie))
    init_random_(model)
    model.save_pretrained(path, max_shard_size="100KB")
    return Path(path)


def run_worker_cases(cases: list[dict], tmp: Path, nproc: int = 2) -> dict:
    """Run ``cases`` in ``tests.vlm.vlm_worker`` on ``nproc`` ranks; case id -> result."""
    import json

    from tests.launch import run_module

    (tmp / "cases.json").write_text(json.dumps(cases))
    run_module("tests.vlm.vlm_worker", [str(tmp / "cases.json"), str(tmp / "out.json")],
               nproc=nproc)
    results = json.loads((tmp / "out.json").read_text())
    print("\n".join(f"  {case:24s} {value}" for case, value in results.items()))
    return results

