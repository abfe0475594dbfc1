"""Tiny random LLaVA models and their conversions, built once per session."""

from pathlib import Path

import pytest

from tests.vlm.tiny_vlms import save_tiny_llava

# case -> llava_config arguments. "default": Llama, features of layer -2 without the class token
# (the last vision layer and post_layernorm are never read); "full": a Qwen2 language model
# (q/k/v bias, tied embeddings), the last layer's features with the class token, a projector
# without biases; "siglip": a SigLIP tower (no class token, patch bias, tanh GeLU; its last
# layer, post_layernorm and pooling head are never read).
VARIANTS = {
    "default": {},
    "full": {"vision_feature_select_strategy": "full", "vision_feature_layer": -1,
             "multimodal_projector_bias": False, "text": "qwen2",
             "text_overrides": {"tie_word_embeddings": True, "use_sliding_window": False}},
    "siglip": {"vision": "siglip", "vision_feature_select_strategy": "full"},
}


@pytest.fixture(scope="session")
def llava_models(tmp_path_factory) -> dict[str, Path]:
    """variant -> HF model directory (fp32, sharded safetensors)."""
    root = tmp_path_factory.mktemp("llava")
    return {name: save_tiny_llava(root / name, **overrides)
            for name, overrides in VARIANTS.items()}


@pytest.fixture(scope="session")
def llava_converted(llava_models, tmp_path_factory) -> dict[str, Path]:
    """variant -> torch_dist checkpoint (TP=1)."""
    from megatron_patch.conversion import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("llava-mcore")
    return {name: convert_hf_to_mcore(path, root / name, progress=False)
            for name, path in llava_models.items()}
