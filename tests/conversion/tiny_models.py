"""Tiny random HF models of every family, built from the transformers config classes (offline)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers

from megatron_patch.conversion.tiny import save_random_model

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
    # Bloom: ALiBi, embedding LayerNorm, per-head fused qkv, biases, tanh GeLU.
    "bloom": (transformers.BloomConfig, {}),
    # Falcon-7B: MQA, attention and MLP in parallel from one input norm, tied, erf GeLU.
    "falcon_mqa": (transformers.FalconConfig, {"multi_query": True}),
    # Falcon-40B/180B: new decoder architecture, GQA, ln_attn + ln_mlp, untied.
    "falcon_gqa": (transformers.FalconConfig, {"new_decoder_architecture": True,
                                               "num_kv_heads": 2, "tie_word_embeddings": False}),
    # StarCoder: MQA, learned positions, biases, tanh GeLU.
    "starcoder_mqa": (transformers.GPTBigCodeConfig, {"n_positions": 64}),
    # StarCoder2: GQA, rope, LayerNorm and linear biases, sliding window, vocab not % TP.
    "starcoder2": (transformers.Starcoder2Config, {"sliding_window": 8, "vocab_size": 251}),
    # GLM-4: half-head interleaved rope (theta 20000), q/k/v bias, fused gate_up, head_dim 32.
    "glm": (transformers.GlmConfig, {"head_dim": 32, "pad_token_id": None, "rope_parameters": {
        "rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5}}),
    # GLM-4-0414: plus post-attention/post-MLP norms; tied.
    "glm4": (transformers.Glm4Config, {"head_dim": 16, "pad_token_id": None,
                                       "tie_word_embeddings": True}),
    # Galactica: OPT with GeLU, position offset 2, biases.
    "galactica": (transformers.OPTConfig, {"ffn_dim": 96, "activation_function": "gelu",
                                           "pad_token_id": 1}),
    # Qwen2-MoE: 4 experts top-2 without renormalisation, gated shared expert, q/k/v bias,
    # layer 1 dense (mlp_only_layers).
    "qwen2_moe": (transformers.Qwen2MoeConfig, {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "mlp_only_layers": [1],
        "use_sliding_window": False}),
    # Mixtral: 4 experts top-2 (renormalised), every layer sparse.
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2,
                                             "intermediate_size": 48}),
    # Qwen3-MoE: 8 small experts top-2 renormalised, q/k norm, tied embeddings.
    "qwen3_moe": (transformers.Qwen3MoeConfig, {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "norm_topk_prob": True, "head_dim": 32, "tie_word_embeddings": True}),
    # DeepSeek-V3: MLA (q/kv LoRA, decoupled rope, yarn), first layer dense, 1 shared expert,
    # sigmoid router with expert bias, 8 experts in 4 groups (2 chosen), top-4, scaling 2.5.
    "deepseek_v3": (transformers.DeepseekV3Config, {
        "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 4,
        "moe_intermediate_size": 16, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "n_group": 4, "topk_group": 2, "q_lora_rank": 48, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 16384, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0}}),
    # DeepSeek-V2-Lite: MLA without q LoRA, softmax top-2 without renormalisation, 2 shared,
    # yarn whose cos/sin (mscale / mscale_all_dim) and softmax (mscale_all_dim) scales differ.
    "deepseek_v2_lite": (transformers.DeepseekV2Config, {
        "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "n_shared_experts": 2, "first_k_dense_replace": 1,
        "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
        "v_head_dim": 16, "routed_scaling_factor": 1.5, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 1.0,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096}}),
}
# Mixture-of-experts cases (also checked at expert parallelism in test_moe.py).
MOE_CASES = {"qwen2_moe", "mixtral", "qwen3_moe", "deepseek_v3", "deepseek_v2_lite"}
# Cases with one key/value head: at TP=2 each rank uses it whole (models/common/head_split.py).
MQA_CASES = {"llama_mqa", "falcon_mqa", "starcoder_mqa"}
# Cases checked at fewer layouts to keep CI time: parity at (TP, PP) = (1, 1) and (2, 2), so
# TP=2 and PP=2 are both exercised, and fewer round-trip layouts.
FEW_LAYOUTS = {"bloom", "falcon_mqa", "falcon_gqa", "starcoder_mqa", "starcoder2", "glm", "glm4",
               "galactica"} | MOE_CASES
# HF models that only serve as the reference of a DERIVED (remote-code) checkpoint, or in the
# training-fidelity tests (vocabularies that split evenly over TP: no padded logits).
REFERENCE_CASES: dict[str, tuple[type, dict]] = {
    "llama_mha": (transformers.LlamaConfig, {"num_key_value_heads": 4}),
    "qwen2_tied": (transformers.Qwen2Config, {"tie_word_embeddings": True,
                                              "use_sliding_window": False}),
}

# HF rope types on a llama or qwen2 of head_dim 16 (8 frequencies) and 64 positions, with
# ``original_max_position_embeddings`` 16 so that sequences of 32 use longrope's long factors.
_LONGROPE = {"short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
             "long_factor": [1.0, 1.3, 1.8, 2.5, 4.0, 6.0, 9.0, 12.0],
             "original_max_position_embeddings": 16}
ROPE_CASES: dict[str, tuple[type, dict]] = {
    "llama_linear": (transformers.LlamaConfig, {"rope_type": "linear", "factor": 2.0}),
    "llama_dynamic": (transformers.LlamaConfig, {"rope_type": "dynamic", "factor": 2.0}),
    "llama_llama3": (transformers.LlamaConfig, {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama_longrope": (transformers.LlamaConfig, {"rope_type": "longrope", **_LONGROPE}),
    "llama_yarn_mscale": (transformers.LlamaConfig, {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 16.0, "beta_slow": 2.0,
        "truncate": False}),
    "llama_yarn_attention_factor": (transformers.LlamaConfig, {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "attention_factor": 1.3}),
    # Qwen2.5's long-context recipe (rope_scaling yarn, factor 4) on a theta of 1e6.
    "qwen2_yarn": (transformers.Qwen2Config, {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "rope_theta": 1000000.0}),
}


def rope_config(case: str) -> transformers.PretrainedConfig:
    """A tiny llama/qwen2 config with the rope dict of ``ROPE_CASES[case]``."""
    return tiny_config(case)


def tiny_config(case: str, **changes) -> transformers.PretrainedConfig:
    """The transformers config of a ``case`` of CASES, REFERENCE_CASES or ROPE_CASES (with
    ``changes``)."""
    if case in ROPE_CASES:
        config_class, rope = ROPE_CASES[case]
        overrides = {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    else:
        config_class, overrides = {**CASES, **REFERENCE_CASES}[case]
    return config_class(**{**_COMMON, **overrides, **changes})


def save_tiny_model(case: str, path: Path, dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> Path:
    """Save a random ``case`` model (sharded safetensors) with non-trivial norms and biases."""
    return save_random_model(tiny_config(case), path, dtype, seed)


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


def _save_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and one ``model.safetensors`` (replacing any shards) to ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")]:
        old.unlink()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def _chatglm(reference: Path, out: Path) -> None:
    """ChatGLM2/3 naming (``ChatGLMModel``) of a ``GlmForCausalLM`` checkpoint."""
    hf = json.loads((reference / "config.json").read_text())
    tensors = read_safetensors(reference)
    config = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"], "kv_channels": hf["head_dim"],
        "num_attention_heads": hf["num_attention_heads"], "multi_query_attention": True,
        "multi_query_group_num": hf["num_key_value_heads"], "padded_vocab_size": hf["vocab_size"],
        "seq_length": hf["max_position_embeddings"], "layernorm_epsilon": hf["rms_norm_eps"],
        "rope_ratio": hf["rope_parameters"]["rope_theta"] / 10000, "rmsnorm": True,
        "post_layer_norm": True, "add_bias_linear": False, "add_qkv_bias": True,
        "apply_residual_connection_post_layernorm": False, "original_rope": True,
    }
    out_tensors = {
        "transformer.embedding.word_embeddings.weight": tensors["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": tensors["model.norm.weight"],
        "transformer.output_layer.weight": tensors["lm_head.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.rand(hf["head_dim"] // 4),  # ignored
    }
    for i in range(hf["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for suffix in ("weight", "bias"):
            out_tensors[f"{dst}self_attention.query_key_value.{suffix}"] = torch.cat(
                [tensors[f"{src}self_attn.{p}_proj.{suffix}"] for p in "qkv"])
        for new, old in [("input_layernorm", "input_layernorm"),
                         ("self_attention.dense", "self_attn.o_proj"),
                         ("post_attention_layernorm", "post_attention_layernorm"),
                         ("mlp.dense_h_to_4h", "mlp.gate_up_proj"),
                         ("mlp.dense_4h_to_h", "mlp.down_proj")]:
            out_tensors[f"{dst}{new}.weight"] = tensors[f"{src}{old}.weight"]
    _save_checkpoint(out, config, out_tensors)


def _baichuan(reference: Path, out: Path, *, alibi: bool = False,
              norm_head: bool = False) -> None:
    """Baichuan naming (``W_pack``) of a multi-head ``LlamaForCausalLM`` checkpoint.

    ``alibi``: a Baichuan-13B config (no ``max_position_embeddings``). ``norm_head``:
    Baichuan2; the reference's ``lm_head`` rows are made unit-norm (rewritten in place) and
    Baichuan2's rows are rescaled copies, so its NormHead reproduces the reference logits.
    """
    hf = json.loads((reference / "config.json").read_text())
    tensors = read_safetensors(reference)
    config = {key: hf[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_hidden_layers", "rms_norm_eps", "vocab_size",
                                       "hidden_act", "tie_word_embeddings")}
    config.update(architectures=["BaichuanForCausalLM"], model_type="baichuan",
                  model_max_length=hf["max_position_embeddings"])
    if not alibi:
        config["max_position_embeddings"] = hf["max_position_embeddings"]
    out_tensors = dict(tensors)
    if norm_head:
        config["z_loss_weight"] = 0
        unit = torch.nn.functional.normalize(tensors["lm_head.weight"], dim=-1)
        _save_checkpoint(reference, hf, {**tensors, "lm_head.weight": unit})
        scale = torch.linspace(0.5, 2.0, unit.shape[0])[:, None]
        out_tensors["lm_head.weight"] = unit * scale
    for i in range(hf["num_hidden_layers"]):
        attention = f"model.layers.{i}.self_attn."
        out_tensors[attention + "W_pack.weight"] = torch.cat(
            [out_tensors.pop(f"{attention}{p}_proj.weight") for p in "qkv"])
    _save_checkpoint(out, config, out_tensors)


# Remote-code checkpoints (not loadable by transformers) written from a reference HF model:
# name -> (reference case, writer(reference_dir, out_dir)).
DERIVED: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "chatglm": ("glm", _chatglm),
    "baichuan": ("llama_mha", _baichuan),
    "baichuan2": ("llama_mha", partial(_baichuan, norm_head=True)),
    "baichuan_alibi": ("llama_mha", partial(_baichuan, alibi=True)),
}


def save_derived(name: str, root: Path) -> tuple[Path, Path]:
    """``(reference HF model dir, remote-code checkpoint dir)`` of a DERIVED case."""
    reference_case, write = DERIVED[name]
    reference = save_tiny_model(reference_case, root / f"{name}-reference")
    write(reference, root / name)
    return reference, root / name
