"""Model sizes per family, as the real Hugging Face ``config.json`` values of each published model.

Launchers turn a size into Megatron flags through the family's own config mapper, so a size here
and a converted checkpoint of the same model always agree. ``tiny`` is the demo model that trains
in minutes on a CPU with the shipped tokenizer (vocabulary 2048).
"""

from __future__ import annotations

from megatron_patch.models.registry import HFConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0}
_LLAMA32_ROPE = {**_LLAMA3_ROPE, "factor": 32.0}


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, **extra) -> HFConfig:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **extra}


_LLAMA2 = {"vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 10000.0}
_LLAMA31 = {"vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_parameters": _LLAMA3_ROPE}
_LLAMA32 = {**_LLAMA31, "rope_parameters": _LLAMA32_ROPE, "tie_word_embeddings": True}

MODEL_SIZES: dict[str, dict[str, HFConfig]] = {
    "llama": {
        "tiny": _llama(256, 4, 4, 2, 688, vocab_size=2048, max_position_embeddings=2048,
                       rope_theta=10000.0),
        "7B": _llama(4096, 32, 32, 32, 11008, **_LLAMA2),      # Llama-2-7B
        "13B": _llama(5120, 40, 40, 40, 13824, **_LLAMA2),     # Llama-2-13B
        "1B": _llama(2048, 16, 32, 8, 8192, head_dim=64, **_LLAMA32),   # Llama-3.2-1B
        "3B": _llama(3072, 28, 24, 8, 8192, head_dim=128, **_LLAMA32),  # Llama-3.2-3B
        "8B": _llama(4096, 32, 32, 8, 14336, **_LLAMA31),      # Llama-3.1-8B
        "70B": _llama(8192, 80, 64, 8, 28672, **_LLAMA31),     # Llama-3.1-70B
    },
}


def model_size_config(family: str, size: str) -> HFConfig:
    """The HF config of ``size`` for ``family``, with a clear error listing the known sizes."""
    sizes = MODEL_SIZES.get(family, {})
    if size not in sizes:
        raise ValueError(f"MODEL_SIZE={size!r} is not known for {family}; known: {list(sizes)}")
    return sizes[size]
