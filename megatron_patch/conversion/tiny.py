"""Tiny random HF models from an HF config: for verification cards and tests (no download).

:func:`shrink_config` turns a full-size ``config.json`` into a tiny one that keeps its
structural features (GQA ratio or MQA, q/k norm, biases, tied embeddings, rope scaling, sliding
window, mixture-of-experts with shared experts and dense-first layers, MLA ranks, ...);
:func:`save_random_model` builds the transformers model of a config with random weights that
make a wrong mapping show (norm weights near 1 but not 1, biases non-zero) and saves it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

HIDDEN, LAYERS, FFN, VOCAB, HEAD_DIM = 64, 4, 96, 256, 16
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HEAD_KEYS = ("num_attention_heads", "n_head")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
_FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base")
# key -> tiny value, applied where the key holds a number (None keeps "absent", e.g. no q LoRA)
_CAPS = {"moe_intermediate_size": 16, "shared_expert_intermediate_size": 48,
         "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
         "qk_rope_head_dim": 16, "v_head_dim": 16, "n_shared_experts": 2, "n_positions": 64,
         "sliding_window": 8, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
         "padded_vocab_size": VOCAB, "seq_length": 64}
_DROP = ("quantization_config", "torch_dtype", "dtype", "_name_or_path", "transformers_version")


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if isinstance(config.get(k), int)), None)


def shrink_config(config: dict[str, Any]) -> dict[str, Any]:
    """A tiny copy of an HF ``config.json`` dict with the same structural features.

    Hidden size 64 (more if many heads), 4 layers, vocabulary 256, head dim 16, the query/key-
    value head ratio kept (MQA stays MQA, MHA stays MHA), at most 8 experts with the same
    top-k fraction, expert groups and dense-first layers kept. Rope, norm, bias, tying and
    activation settings are kept as they are. Applying it twice gives the same result.
    """
    out = {k: v for k, v in config.items() if k not in _DROP}
    heads_key, kv_key = _first(out, _HEAD_KEYS), _first(out, _KV_KEYS)
    heads = out[heads_key] if heads_key else 4
    kv = out[kv_key] if kv_key else heads
    if out.get("multi_query") and not out.get("new_decoder_architecture"):
        kv = 1  # Falcon-7B style MQA
    ratio = max(1, heads // max(kv, 1))
    tiny_kv = heads_tiny = 0
    if kv == 1:
        tiny_kv, heads_tiny = 1, min(heads, 4)
    elif ratio == 1:
        tiny_kv = heads_tiny = min(heads, 4)
    else:
        tiny_kv = 2 if kv % 2 == 0 else 1
        heads_tiny = tiny_kv * min(ratio, 8)
    hidden = max(HIDDEN, heads_tiny * HEAD_DIM) if heads_key else HIDDEN
    hidden_key = _first(out, _HIDDEN_KEYS)
    if hidden_key and out[hidden_key] <= hidden and heads <= heads_tiny:
        hidden = out[hidden_key]  # already tiny
    if hidden_key:
        out[hidden_key] = hidden
    if heads_key:
        out[heads_key] = heads_tiny
    if kv_key:
        out[kv_key] = tiny_kv
    if isinstance(out.get("head_dim"), int) and heads_key:
        # keep a head dim that differs from hidden / heads (Qwen3, Mistral-Nemo) different
        natural = config[hidden_key] // heads if hidden_key else out["head_dim"]
        out["head_dim"] = HEAD_DIM if out["head_dim"] == natural else 2 * HEAD_DIM
    for key in _FFN_KEYS:
        if isinstance(out.get(key), int):
            out[key] = min(out[key], FFN)
    layers_key = _first(out, _LAYER_KEYS)
    layers = min(out[layers_key], LAYERS) if layers_key else LAYERS
    if layers_key:
        out[layers_key] = layers
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][:layers]
    if isinstance(out.get("mlp_only_layers"), list):
        out["mlp_only_layers"] = [i for i in out["mlp_only_layers"] if i < layers]
    if isinstance(out.get("max_window_layers"), int):
        out["max_window_layers"] = min(out["max_window_layers"], layers)
    for key, cap in _CAPS.items():
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = min(out[key], cap)
    if isinstance(out.get("vocab_size"), int):
        out["vocab_size"] = min(out["vocab_size"], VOCAB)
        _special_tokens_in_vocabulary(out, out["vocab_size"])
    if hidden_key and out.get("word_embed_proj_dim") == config[hidden_key]:
        out["word_embed_proj_dim"] = hidden  # OPT: no projection stays no projection
    if not any(k in out for k in _ROPE_KEYS) and isinstance(out.get("max_position_embeddings"),
                                                           int):
        out["max_position_embeddings"] = min(out["max_position_embeddings"], 64)  # learned
    _shrink_experts(out)
    if "qk_rope_head_dim" in out and isinstance(out.get("head_dim"), int):
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: transformers' head_dim is the rope part
    if "qk_head_dim" in out:
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    if heads_key and hidden_key:
        _shrink_longrope(out, out.get("head_dim") or out[hidden_key] // out[heads_key])
    return out


def _shrink_longrope(out: dict[str, Any], head_dim: int) -> None:
    """Longrope's per-frequency factor lists, evenly subsampled to the tiny head's frequencies."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = out.get(key)
        if not isinstance(rope, dict):
            continue
        pairs = int(head_dim * float(out.get("partial_rotary_factor", 1.0))) // 2
        for name in ("short_factor", "long_factor"):
            factors = rope.get(name)
            if isinstance(factors, list) and len(factors) > pairs > 0:
                step = len(factors) / pairs
                out[key] = rope = {**rope, name: [factors[int(i * step)] for i in range(pairs)]}


def _special_tokens_in_vocabulary(out: dict[str, Any], vocab: int) -> None:
    """Special token ids past the tiny vocabulary become distinct ids at its end."""
    spare = iter(range(vocab - 1, 0, -1))
    for key in sorted(k for k in out if k.endswith("_token_id")):
        value = out[key]
        if isinstance(value, int) and value >= vocab:
            out[key] = next(spare)
        elif isinstance(value, list):
            out[key] = [v if v < vocab else next(spare) for v in value]


def _shrink_experts(out: dict[str, Any]) -> None:
    """At most 8 experts, top-k at most half of them, expert groups kept (enough chosen
    groups to hold top-k experts)."""
    key = _first(out, _EXPERT_KEYS)
    if key is None or out[key] <= 1:
        return
    experts = min(out[key], 8)
    groups = out.get("n_group")
    if isinstance(groups, int) and groups > 1:
        groups = min(groups, experts // 2)
        while experts % groups:
            groups -= 1
        out["n_group"] = groups
        if isinstance(out.get("topk_group"), int):
            out["topk_group"] = max(1, min(out["topk_group"], groups // 2))
    top_k = out.get("num_experts_per_tok")
    if isinstance(top_k, int):
        top_k = out["num_experts_per_tok"] = max(1, min(top_k, experts // 2))
        if isinstance(groups, int) and groups > 1 and isinstance(out.get("topk_group"), int):
            per_group = experts // groups
            out["topk_group"] = max(out["topk_group"], math.ceil(top_k / per_group))
    out[key] = experts


def config_from_dict(config: dict[str, Any]):
    """The transformers configuration object of a ``config.json`` dict (by ``model_type``)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config model_type {model_type!r} is not a transformers model type "
                         "(remote-code models cannot be built here)")
    return CONFIG_MAPPING[model_type].from_dict(dict(config))


def load_config_json(source: str | Path) -> dict[str, Any]:
    """``config.json`` of an HF model directory, or a config JSON file itself."""
    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no HF config (expected a config JSON file or an HF "
                                "model directory with config.json)")
    return json.loads(path.read_text())


@torch.no_grad()
def init_random_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights in place: norm weights N(1, 0.1), other weights and biases N(0, 0.15).

    Non-trivial norms and biases make a swapped or dropped mapping change the outputs.
    DeepSeek-V3's expert-selection bias buffer is randomised too.
    """
    for name, param in model.named_parameters():
        if param.ndim == 1 and not name.endswith("bias"):
            param.normal_(1.0, 0.1)
        else:
            param.normal_(0.0, 0.15)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0.0, 0.1)
    return model


def save_random_model(config, path: str | Path, dtype: torch.dtype = torch.float32,
                      seed: int = 0, max_shard_size: str = "40KB") -> Path:
    """Save a random causal LM of ``config`` (a transformers config or a config dict)."""
    import transformers

    if isinstance(config, dict):
        config = config_from_dict(config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    init_random_(model)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)
