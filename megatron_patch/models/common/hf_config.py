"""Shared HF ``config.json`` <-> Megatron argument mapping for llama-style decoders.

Llama, Mistral, Qwen2 and Qwen3 differ only in a few switches (q/k/v bias, per-head q/k norm,
sliding window), so they share :func:`llama_style_to_megatron` / :func:`megatron_to_llama_style`.
Fields that would change the model but have no Megatron equivalent raise
:class:`UnsupportedConfigError` naming the field, never a silently different model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.models.common.rope import HF_ROPE_FIELDS, HF_ROPE_TYPES, USES_ORIGINAL_LENGTH

# Megatron's llama3 rope scaling hard-codes these (megatron.core RotaryEmbedding._apply_scaling);
# other llama3 constants go through --hf-rope-scaling.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def load_hf_config(hf_dir: str | Path) -> HFConfig:
    """Read ``config.json`` from an HF model directory with a clear error if absent."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a Hugging Face config.json in {hf_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _require(hf: HFConfig, field: str) -> Any:
    if field not in hf or hf[field] is None:
        raise UnsupportedConfigError(f"config.json: required field {field!r} is missing")
    return hf[field]


def _expect(hf: HFConfig, field: str, allowed: tuple, default: Any) -> Any:
    value = hf.get(field, default)
    if value is None:
        value = default
    if value not in allowed:
        raise UnsupportedConfigError(
            f"config.json: {field}={value!r} is not supported (expected one of {list(allowed)})"
        )
    return value


def rope_parameters(hf: HFConfig) -> dict[str, Any]:
    """Rope settings from either transformers v5 ``rope_parameters`` or v4 ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _hf_rope_scaling(hf: HFConfig, rope: dict[str, Any]) -> dict[str, Any]:
    """The rope dict for ``--hf-rope-scaling`` (rope_theta aside), refusing what HF can't load."""
    kind = rope["rope_type"]
    missing = [key for key in HF_ROPE_FIELDS[kind] if key not in rope]
    if missing:
        raise UnsupportedConfigError(f"config.json: rope {kind} needs {missing[0]!r} in "
                                     "rope_parameters/rope_scaling")
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    if kind in USES_ORIGINAL_LENGTH and hf.get("original_max_position_embeddings"):
        # transformers prefers the top-level value (Phi-3 style) to the one in the rope dict.
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    if kind == "longrope":
        heads = int(_require(hf, "num_attention_heads"))
        head_dim = int(hf.get("head_dim") or int(_require(hf, "hidden_size")) // heads)
        pairs = int(head_dim * float(hf.get("partial_rotary_factor", 1.0))) // 2
        for key in ("short_factor", "long_factor"):
            if not isinstance(rope[key], list) or len(rope[key]) != pairs:
                raise UnsupportedConfigError(
                    f"config.json: rope longrope {key} must be a list of {pairs} numbers "
                    f"(one per rotary channel pair), got {rope[key]!r}")
    return scaling


def rope_to_megatron(hf: HFConfig) -> MegatronArgs:
    """Megatron's rope arguments for an HF config: its own rope where it is exact, else
    ``hf_rope_scaling`` (:mod:`~megatron_patch.models.common.rope`)."""
    rope = rope_parameters(hf)
    theta = float(rope["rope_theta"])
    args: MegatronArgs = {
        "position_embedding_type": "rope",
        "rotary_base": int(theta) if theta.is_integer() else theta,
        "rotary_percent": float(hf.get("partial_rotary_factor", 1.0)),
    }
    kind = rope["rope_type"]
    if kind == "default":
        return args
    if kind == "linear":
        return {**args, "rotary_seq_len_interpolation_factor": float(rope["factor"])}
    if kind == "llama3" and all(float(rope.get(key, value)) == value
                                for key, value in _LLAMA3_FIXED.items()):
        # Llama 3.1's constants: Megatron-Core's own llama3 scaling (fused rope kernels too).
        return {**args, "use_rope_scaling": True, "rope_scaling_factor": float(rope["factor"])}
    if kind in HF_ROPE_TYPES:
        return {**args, "hf_rope_scaling": _hf_rope_scaling(hf, rope)}
    raise UnsupportedConfigError(
        f"config.json: rope type {kind!r} is not supported "
        f"(default, linear, {', '.join(HF_ROPE_TYPES)})"
    )


def rope_to_hf(args: Any) -> dict[str, Any]:
    """HF ``rope_parameters`` for Megatron's rope arguments (inverse of the mapping above)."""
    theta = float(args.rotary_base)
    if getattr(args, "hf_rope_scaling", None):
        return {**args.hf_rope_scaling, "rope_theta": theta}
    if getattr(args, "use_rope_scaling", False):
        return {"rope_type": "llama3", "factor": float(args.rope_scaling_factor),
                **_LLAMA3_FIXED, "rope_theta": theta}
    if getattr(args, "rotary_seq_len_interpolation_factor", None):
        return {"rope_type": "linear", "factor": float(args.rotary_seq_len_interpolation_factor),
                "rope_theta": theta}
    return {"rope_type": "default", "rope_theta": theta}


def _effective_window(hf: HFConfig) -> int | None:
    """``sliding_window``, or None when it covers ``max_position_embeddings`` (a no-op)."""
    window = hf.get("sliding_window")
    if window is None or int(window) >= int(hf.get("max_position_embeddings", 0)):
        return None
    return int(window)


def mistral_window(hf: HFConfig) -> int | None:
    """Mistral: ``sliding_window`` applies to every layer (``layer_types`` is ignored by HF)."""
    return _effective_window(hf)


def qwen_window(hf: HFConfig) -> int | None:
    """Qwen2/3: a window only with ``use_sliding_window``, on the layers ``layer_types`` marks.

    Without ``layer_types`` (configs written before transformers 5) layers from
    ``max_window_layers`` on slide. Mixing full and sliding layers is not supported.
    """
    if not hf.get("use_sliding_window"):
        return None
    layers = int(_require(hf, "num_hidden_layers"))
    first = int(hf.get("max_window_layers", 0))
    kinds = set(hf.get("layer_types") or
                ["full_attention"] * min(first, layers) + ["sliding_attention"] * (layers - first))
    if kinds == {"full_attention"}:
        return None
    if kinds != {"sliding_attention"}:
        raise UnsupportedConfigError(
            f"config.json: layer_types/max_window_layers mix {sorted(kinds)}; only all-full or "
            "all-sliding attention is supported"
        )
    return _effective_window(hf)


def llama_style_to_megatron(
    hf: HFConfig,
    *,
    qkv_bias: bool = False,
    qk_layernorm: bool = False,
    window: Callable[[HFConfig], int | None] | None = None,
) -> MegatronArgs:
    """Map a llama-style HF config to Megatron argument values.

    ``qkv_bias``: the family always has a bias on q/k/v only (Qwen2). ``qk_layernorm``: per-head
    RMSNorm on q and k (Qwen3). ``window``: how the family reads its sliding window (HF
    semantics: the token and ``window - 1`` before it); None: the family has none.
    """
    _expect(hf, "hidden_act", ("silu",), "silu")
    for field in ("mlp_bias", "attention_bias"):
        if hf.get(field):
            raise UnsupportedConfigError(
                f"config.json: {field}=true is not supported (bias on o_proj/MLP)"
            )
    heads = int(_require(hf, "num_attention_heads"))
    hidden = int(_require(hf, "hidden_size"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    window_tokens = window(hf) if window else None
    return {
        "num_layers": int(_require(hf, "num_hidden_layers")),
        "hidden_size": hidden,
        "ffn_hidden_size": int(_require(hf, "intermediate_size")),
        "num_attention_heads": heads,
        "group_query_attention": kv_heads != heads,
        "num_query_groups": kv_heads,
        "kv_channels": head_dim,
        "max_position_embeddings": int(hf.get("max_position_embeddings", 4096)),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "swiglu": True,
        "add_bias_linear": False,
        "add_qkv_bias": qkv_bias,
        "qk_layernorm": qk_layernorm,
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
        "vocab_size": int(_require(hf, "vocab_size")),
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "hidden_dropout": 0.0,
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        # Transformer Engine's (left, right) window: query i attends keys i-left .. i.
        "window_size": None if window_tokens is None else (window_tokens - 1, 0),
        **rope_to_megatron(hf),
    }


def megatron_window(args: Any) -> int | None:
    """HF ``sliding_window`` from Megatron's ``window_size`` (None: full attention)."""
    window = getattr(args, "window_size", None)
    return None if window is None else int(window[0]) + 1


def qwen_window_fields(args: Any) -> HFConfig:
    """Qwen2/3 ``config.json`` window fields for Megatron's ``window_size``."""
    window = megatron_window(args)
    return {"use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": 0 if window else args.num_layers}


def megatron_to_llama_style(
    args: Any, architecture: str, model_type: str, **extra: Any
) -> HFConfig:
    """Inverse of :func:`llama_style_to_megatron`: an HF config dict from Megatron args.

    ``extra`` adds family-specific fields (e.g. Qwen3's ``attention_bias``).
    """
    rope = rope_to_hf(args)
    heads = args.num_attention_heads
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": args.num_query_groups if args.group_query_attention else heads,
        "head_dim": args.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.layernorm_epsilon,
        "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
        "vocab_size": args.vocab_size,
        "attention_dropout": args.attention_dropout,
        "initializer_range": args.init_method_std,
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
    }
    if not math.isclose(args.rotary_percent, 1.0):
        config["partial_rotary_factor"] = args.rotary_percent
    return {**config, **extra}
