"""Tiny random HF models on the byte tokenizer's vocabulary and their Megatron conversions."""

from pathlib import Path

import pytest
import transformers

VOCAB = 257  # ByteTokenizer: 256 bytes + end of document (also padding)
_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "vocab_size": VOCAB, "rms_norm_eps": 1e-5}
# name -> (config, seed, tensor-parallel size the vocabulary is padded for)
MODELS = {
    "policy": (transformers.LlamaConfig(**_SHAPE, tie_word_embeddings=False), 0, 2),
    "reference": (transformers.LlamaConfig(**_SHAPE, tie_word_embeddings=False), 1, 2),
    "qwen2": (transformers.Qwen2Config(**_SHAPE, tie_word_embeddings=True,
                                       use_sliding_window=False), 2, 1),
    "qwen3": (transformers.Qwen3Config(**_SHAPE, head_dim=32, tie_word_embeddings=False), 3, 1),
}


@pytest.fixture(scope="session")
def rlhf_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (HF directory, torch_dist checkpoint converted from it)."""
    from megatron_patch.conversion import convert_hf_to_mcore
    from megatron_patch.conversion.tiny import save_random_model

    root = tmp_path_factory.mktemp("rlhf_models")
    out = {}
    for name, (config, seed, tp) in MODELS.items():
        hf = save_random_model(config, root / f"hf_{name}", seed=seed)
        mcore = convert_hf_to_mcore(hf, root / f"mcore_{name}", tp=tp,
                                    make_vocab_size_divisible_by=1, progress=False)
        out[name] = (hf, mcore)
    return out
