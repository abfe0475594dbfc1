"""Tiny random HF models of every family, built from the transformers config classes (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
           "rms_norm_eps": 1e-5, "vocab_size": 250}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0}

# name -> (config class, overrides). Together they cover GQA and MQA, tied embeddings, llama3
# rope scaling, a sliding window shorter than the sequence, q/k/v bias, q/k norm with a head_dim
# that is not hidden/heads, and a vocabulary not divisible by the tensor-parallel size.
CASES: dict[str, tuple[type, dict]] = {
    "llama3": (transformers.LlamaConfig,
               {"vocab_size": 251, "tie_word_embeddings": True, "rope_parameters": _LLAMA3_ROPE,
                "max_position_embeddings": 16384}),
    "llama_mqa": (transformers.LlamaConfig, {"num_key_value_heads": 1}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 8, "head_dim": 16}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True, "vocab_size": 251,
                                         "use_sliding_window": False}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32, "attention_bias": False}),
}


@torch.no_grad()
def save_tiny_model(case: str, path: Path, dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> Path:
    """Save a random ``case`` model (sharded safetensors) with non-trivial norms and biases."""
    config_class, overrides = CASES[case]
    config = config_class(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    for name, param in model.named_parameters():
        if param.ndim == 1 and not name.endswith("bias"):
            param.normal_(1.0, 0.1)  # norms: distinguishable, so a swapped mapping shows
        else:
            param.normal_(0.0, 0.15)
    model.to(dtype).save_pretrained(path, max_shard_size="40KB")
    return path


def save_tokenizer(path: Path, size: int) -> None:
    """A word-level tokenizer of ``size`` tokens with a chat template, saved into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(size)},
                                         unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0",
                                                     bos_token="t1", eos_token="t2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
