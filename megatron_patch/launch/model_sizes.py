"""Published model sizes as the real Hugging Face ``config.json`` values, one table entry each.

Launchers turn a size into Megatron flags through the family's own config mapper, so a size here
and a converted checkpoint of the same model always agree. An entry belongs to the family that
registers its ``architectures`` (``family_for_hf_config``); entries of families that are not
registered are not offered. ``tiny`` sizes are demo models that train in minutes on a CPU with the
shipped tokenizer (vocabulary 2048). Adding a model is one :class:`ModelSize` line in ``MODELS``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from megatron_patch.mapping.config import HFConfig
from megatron_patch.models.registry import family_for_hf_config


@dataclass(frozen=True)
class ModelSize:
    """One published model: its name, its ``MODEL_SIZE`` within its family, its config.json."""

    name: str  # canonical, lower case, as ``megatron-patch plan --model`` takes it
    size: str  # the launcher's MODEL_SIZE within the family
    hf_config: HFConfig

    @property
    def is_moe(self) -> bool:
        """Whether the model has routed experts."""
        return any(key in self.hf_config for key in _EXPERT_FIELDS)


_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _decoder(architecture: str, model_type: str, hidden: int, layers: int, heads: int,
             kv_heads: int, ffn: int, **extra: Any) -> HFConfig:
    return {"architectures": [architecture], "model_type": model_type, "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "hidden_act": "silu",
            "initializer_range": 0.02, "attention_dropout": 0.0, **extra}


def _llama(*shape: int, **extra: Any) -> HFConfig:
    return _decoder("LlamaForCausalLM", "llama", *shape,
                    **{"rms_norm_eps": 1e-5, "tie_word_embeddings": False, **extra})


def _mistral(*shape: int, **extra: Any) -> HFConfig:
    return _decoder("MistralForCausalLM", "mistral", *shape,
                    **{"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "head_dim": 128,
                       **extra})


def _qwen2(*shape: int, **extra: Any) -> HFConfig:
    return _decoder("Qwen2ForCausalLM", "qwen2", *shape,
                    **{"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
                       **extra})


def _qwen3(*shape: int, **extra: Any) -> HFConfig:
    return _decoder("Qwen3ForCausalLM", "qwen3", *shape,
                    **{"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "head_dim": 128,
                       "attention_bias": False, "use_sliding_window": False,
                       "max_position_embeddings": 40960, "vocab_size": 151936, **extra})


def _bloom(hidden: int, layers: int, heads: int, **extra: Any) -> HFConfig:
    return {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": hidden,
            "n_layer": layers, "n_head": heads, "vocab_size": 250880, "layer_norm_epsilon": 1e-5,
            "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
            "hidden_dropout": 0.0, "initializer_range": 0.02, **extra}


def _falcon(hidden: int, layers: int, heads: int, kv_heads: int | None, **extra: Any
            ) -> HFConfig:
    """Falcon; ``kv_heads`` None: Falcon-7B's multi-query layout, else the new decoder."""
    layout = ({"multi_query": True, "new_decoder_architecture": False} if kv_heads is None
              else {"num_kv_heads": kv_heads, "new_decoder_architecture": True})
    return {"architectures": ["FalconForCausalLM"], "model_type": "falcon",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            **layout, "parallel_attn": True, "bias": False, "alibi": False,
            "vocab_size": 65024, "layer_norm_epsilon": 1e-5, "attention_dropout": 0.0,
            "hidden_dropout": 0.0, "initializer_range": 0.02, **extra}


def _bigcode(hidden: int, layers: int, heads: int, **extra: Any) -> HFConfig:
    return {"architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode",
            "n_embd": hidden, "n_layer": layers, "n_head": heads, "n_inner": 4 * hidden,
            "n_positions": 8192, "multi_query": True, "vocab_size": 49152,
            "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5,
            "attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
            "initializer_range": 0.02, **extra}


def _starcoder2(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
                **extra: Any) -> HFConfig:
    return {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "vocab_size": 49152,
            "max_position_embeddings": 16384, "sliding_window": 4096, "norm_epsilon": 1e-5,
            "use_bias": True, "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.1,
            "residual_dropout": 0.1, "embedding_dropout": 0.1, **extra}


def _chatglm(layers: int, vocab: int, **extra: Any) -> HFConfig:
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": layers,
            "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
            "num_attention_heads": 32, "multi_query_attention": True,
            "multi_query_group_num": 2, "padded_vocab_size": vocab, "seq_length": 8192,
            "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True,
            "add_bias_linear": False, "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": False, "original_rope": True,
            "attention_dropout": 0.0, "hidden_dropout": 0.0, **extra}


def _opt(hidden: int, layers: int, heads: int, **extra: Any) -> HFConfig:
    return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": hidden,
            "word_embed_proj_dim": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "ffn_dim": 4 * hidden, "vocab_size": 50272,
            "max_position_embeddings": 2048, "activation_function": "relu",
            "do_layer_norm_before": True, "enable_bias": True, "dropout": 0.1,
            "attention_dropout": 0.0, "init_std": 0.02, "tie_word_embeddings": True, **extra}


def _baichuan(architecture: str, hidden: int, layers: int, ffn: int, vocab: int,
              **extra: Any) -> HFConfig:
    """Baichuan(2); the 13B models (ALiBi) have ``model_max_length`` instead of positions."""
    return _decoder(architecture, "baichuan", hidden, layers, hidden // 128, hidden // 128, ffn,
                    **{"vocab_size": vocab, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                       **extra})


_TINY = {"vocab_size": 2048, "max_position_embeddings": 2048, "rope_theta": 10000.0}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                "rope_theta": 500000.0}
_LLAMA2 = {"vocab_size": 32000, "max_position_embeddings": 4096, "rope_theta": 10000.0}
_LLAMA3 = {"vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}
_LLAMA31 = {"vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_parameters": _LLAMA3_ROPE}
_LLAMA32 = {**_LLAMA31, "rope_parameters": {**_LLAMA3_ROPE, "factor": 32.0},
            "tie_word_embeddings": True}
_QWEN25_SMALL = {"vocab_size": 151936, "tie_word_embeddings": True}
_QWEN25_LARGE = {"vocab_size": 152064, "tie_word_embeddings": False,
                 "max_position_embeddings": 131072}
_MOE_ROUTER = {"output_router_logits": False, "router_aux_loss_coef": 0.001}

MODELS: tuple[ModelSize, ...] = (
    # Llama 2 / 3 / 3.1 / 3.2 (LlamaForCausalLM); MODEL_SIZE 8B/70B/405B are Llama-3.1.
    ModelSize("llama-tiny", "tiny", _llama(256, 4, 4, 2, 688, **_TINY)),
    ModelSize("llama2-7b", "7B", _llama(4096, 32, 32, 32, 11008, **_LLAMA2)),
    ModelSize("llama2-13b", "13B", _llama(5120, 40, 40, 40, 13824, **_LLAMA2)),
    ModelSize("llama2-70b", "llama2-70B", _llama(8192, 80, 64, 8, 28672, **_LLAMA2)),
    ModelSize("llama3-8b", "llama3-8B", _llama(4096, 32, 32, 8, 14336, **_LLAMA3)),
    ModelSize("llama3-70b", "llama3-70B", _llama(8192, 80, 64, 8, 28672, **_LLAMA3)),
    ModelSize("llama3.1-8b", "8B", _llama(4096, 32, 32, 8, 14336, **_LLAMA31)),
    ModelSize("llama3.1-70b", "70B", _llama(8192, 80, 64, 8, 28672, **_LLAMA31)),
    ModelSize("llama3.1-405b", "405B", _llama(16384, 126, 128, 8, 53248, **_LLAMA31)),
    ModelSize("llama3.2-1b", "1B", _llama(2048, 16, 32, 8, 8192, head_dim=64, **_LLAMA32)),
    ModelSize("llama3.2-3b", "3B", _llama(3072, 28, 24, 8, 8192, head_dim=128, **_LLAMA32)),
    # Mistral (MistralForCausalLM); v0.1 slides a 4096-token window, v0.3 does not.
    ModelSize("mistral-tiny", "tiny", _mistral(256, 4, 4, 2, 688, **{
        **_TINY, "head_dim": 64, "sliding_window": 64})),
    ModelSize("mistral-7b-v0.1", "7B-v0.1", _mistral(
        4096, 32, 32, 8, 14336, vocab_size=32000, max_position_embeddings=32768,
        rope_theta=10000.0, sliding_window=4096)),
    ModelSize("mistral-7b", "7B", _mistral(  # Mistral-7B-v0.3
        4096, 32, 32, 8, 14336, vocab_size=32768, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None)),
    # Qwen2.5 (Qwen2ForCausalLM): q/k/v bias; the small sizes tie their embeddings.
    ModelSize("qwen2-tiny", "tiny", _qwen2(256, 4, 4, 2, 688, **{**_TINY,
                                                                 "tie_word_embeddings": True})),
    ModelSize("qwen2.5-0.5b", "0.5B", _qwen2(896, 24, 14, 2, 4864, max_position_embeddings=32768,
                                             **_QWEN25_SMALL)),
    ModelSize("qwen2.5-1.5b", "1.5B", _qwen2(1536, 28, 12, 2, 8960,
                                             max_position_embeddings=131072, **_QWEN25_SMALL)),
    ModelSize("qwen2.5-3b", "3B", _qwen2(2048, 36, 16, 2, 11008, max_position_embeddings=32768,
                                         **_QWEN25_SMALL)),
    ModelSize("qwen2.5-7b", "7B", _qwen2(3584, 28, 28, 4, 18944, **_QWEN25_LARGE)),
    ModelSize("qwen2.5-14b", "14B", _qwen2(5120, 48, 40, 8, 13824, rms_norm_eps=1e-5,
                                           **_QWEN25_LARGE)),
    ModelSize("qwen2.5-32b", "32B", _qwen2(5120, 64, 40, 8, 27648, rms_norm_eps=1e-5,
                                           **_QWEN25_LARGE)),
    ModelSize("qwen2.5-72b", "72B", _qwen2(8192, 80, 64, 8, 29568, rms_norm_eps=1e-5,
                                           **_QWEN25_LARGE)),
    # Qwen3 dense (Qwen3ForCausalLM): per-head q/k RMSNorm, head_dim 128.
    ModelSize("qwen3-tiny", "tiny", _qwen3(256, 4, 4, 2, 688, **{
        **_TINY, "head_dim": 64, "tie_word_embeddings": True})),
    ModelSize("qwen3-0.6b", "0.6B", _qwen3(1024, 28, 16, 8, 3072, tie_word_embeddings=True)),
    ModelSize("qwen3-1.7b", "1.7B", _qwen3(2048, 28, 16, 8, 6144, tie_word_embeddings=True)),
    ModelSize("qwen3-4b", "4B", _qwen3(2560, 36, 32, 8, 9728, tie_word_embeddings=True)),
    ModelSize("qwen3-8b", "8B", _qwen3(4096, 36, 32, 8, 12288, tie_word_embeddings=False)),
    ModelSize("qwen3-14b", "14B", _qwen3(5120, 40, 40, 8, 17408, tie_word_embeddings=False)),
    ModelSize("qwen3-32b", "32B", _qwen3(5120, 64, 64, 8, 25600, tie_word_embeddings=False)),
    # Bloom (ALiBi, embedding LayerNorm), Falcon (parallel attention/MLP), StarCoder, GLM.
    ModelSize("bloom-tiny", "tiny", _bloom(256, 4, 4, vocab_size=2048)),
    ModelSize("bloom-560m", "560M", _bloom(1024, 24, 16)),
    ModelSize("bloom-1b1", "1B1", _bloom(1536, 24, 16)),
    ModelSize("bloom-1b7", "1B7", _bloom(2048, 24, 16)),
    ModelSize("bloom-3b", "3B", _bloom(2560, 30, 32)),
    ModelSize("bloom-7b1", "7B1", _bloom(4096, 30, 32)),
    ModelSize("bloom-176b", "176B", _bloom(14336, 70, 112)),
    ModelSize("falcon-tiny", "tiny", _falcon(256, 4, 4, 2, vocab_size=2048,
                                             max_position_embeddings=2048, rope_theta=10000.0)),
    ModelSize("falcon-7b", "7B", _falcon(4544, 32, 71, None)),
    ModelSize("falcon-40b", "40B", _falcon(8192, 60, 128, 8)),
    ModelSize("falcon-180b", "180B", _falcon(14848, 80, 232, 8)),
    ModelSize("starcoder-tiny", "tiny", _bigcode(256, 4, 4, vocab_size=2048, n_positions=2048)),
    ModelSize("starcoderbase-1b", "1B", _bigcode(2048, 24, 16)),
    ModelSize("starcoderbase-3b", "3B", _bigcode(2816, 36, 22)),
    ModelSize("starcoderbase-7b", "7B", _bigcode(4096, 42, 32)),
    ModelSize("starcoder", "15B", _bigcode(6144, 40, 48)),
    ModelSize("starcoder2-tiny", "tiny", _starcoder2(256, 4, 4, 2, 1024, vocab_size=2048,
                                                     max_position_embeddings=2048,
                                                     sliding_window=None, rope_theta=10000.0)),
    ModelSize("starcoder2-3b", "3B", _starcoder2(3072, 30, 24, 2, 12288,
                                                 rope_theta=999999.4420358813,
                                                 initializer_range=0.018042)),
    ModelSize("starcoder2-7b", "7B", _starcoder2(4608, 32, 36, 4, 18432, rope_theta=1000000.0,
                                                 initializer_range=0.018042)),
    ModelSize("starcoder2-15b", "15B", _starcoder2(6144, 40, 48, 4, 24576, rope_theta=100000.0,
                                                   initializer_range=0.01275,
                                                   tie_word_embeddings=False)),
    ModelSize("glm-tiny", "tiny", _decoder(
        "GlmForCausalLM", "glm", 256, 4, 4, 2, 688, head_dim=64, partial_rotary_factor=0.5,
        attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False, **_TINY)),
    ModelSize("glm-4-9b", "9B", _decoder(  # THUDM/glm-4-9b-hf
        "GlmForCausalLM", "glm", 4096, 40, 32, 2, 13696, head_dim=128,
        partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1.5625e-07,
        rope_theta=10000.0, vocab_size=151552, max_position_embeddings=8192,
        tie_word_embeddings=False)),
    ModelSize("chatglm-tiny", "tiny", {
        **_chatglm(4, 2048), "hidden_size": 256, "ffn_hidden_size": 688, "kv_channels": 64,
        "num_attention_heads": 4, "seq_length": 2048}),
    ModelSize("chatglm2-6b", "chatglm2-6B", _chatglm(28, 65024, seq_length=32768)),
    ModelSize("chatglm3-6b", "6B", _chatglm(28, 65024)),
    ModelSize("glm-4-9b-chatglm", "glm4-9B", _chatglm(40, 151552, layernorm_epsilon=1.5625e-07)),
    ModelSize("baichuan-tiny", "tiny", _baichuan("BaichuanForCausalLM", 256, 4, 688, 2048,
                                                 max_position_embeddings=2048, z_loss_weight=0)),
    ModelSize("baichuan-7b", "7B", _baichuan("BaiChuanForCausalLM", 4096, 32, 11008, 64000,
                                             max_position_embeddings=4096)),
    ModelSize("baichuan-13b", "13B", _baichuan("BaichuanForCausalLM", 5120, 40, 13696, 64000,
                                               model_max_length=4096)),
    ModelSize("baichuan2-7b", "baichuan2-7B", _baichuan(
        "BaichuanForCausalLM", 4096, 32, 11008, 125696, max_position_embeddings=4096,
        z_loss_weight=0)),
    ModelSize("baichuan2-13b", "baichuan2-13B", _baichuan(
        "BaichuanForCausalLM", 5120, 40, 13696, 125696, model_max_length=4096,
        z_loss_weight=0)),
    ModelSize("opt-tiny", "tiny", _opt(256, 4, 4, vocab_size=2048, dropout=0.0)),
    ModelSize("opt-125m", "125M", _opt(768, 12, 12)),
    ModelSize("opt-1.3b", "1.3B", _opt(2048, 24, 32)),
    ModelSize("opt-2.7b", "2.7B", _opt(2560, 32, 32)),
    ModelSize("opt-6.7b", "6.7B", _opt(4096, 32, 32)),
    ModelSize("opt-13b", "13B", _opt(5120, 40, 40)),
    ModelSize("opt-30b", "30B", _opt(7168, 48, 56)),
    ModelSize("opt-66b", "66B", _opt(9216, 64, 72)),
    # Mixture-of-experts models: offered once their architecture is registered.
    ModelSize("mixtral-tiny", "tiny", _decoder(
        "MixtralForCausalLM", "mixtral", 256, 4, 4, 2, 256, num_local_experts=4,
        num_experts_per_tok=2, rms_norm_eps=1e-5, tie_word_embeddings=False, **_TINY)),
    ModelSize("qwen2-moe-tiny", "tiny", _decoder(
        "Qwen2MoeForCausalLM", "qwen2_moe", 256, 4, 4, 2, 512, moe_intermediate_size=128,
        shared_expert_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        use_sliding_window=False, tie_word_embeddings=False, **_TINY)),
    ModelSize("qwen3-moe-tiny", "tiny", _decoder(
        "Qwen3MoeForCausalLM", "qwen3_moe", 256, 4, 4, 2, 512, head_dim=64,
        moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, attention_bias=False,
        use_sliding_window=False, tie_word_embeddings=False, **_TINY)),
    ModelSize("deepseek-tiny", "tiny", _decoder(
        "DeepseekV3ForCausalLM", "deepseek_v3", 256, 4, 4, 4, 512, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_intermediate_size=128, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, attention_bias=False, rms_norm_eps=1e-6,
        tie_word_embeddings=False, **_TINY)),
    ModelSize("mixtral-8x7b", "8x7B", _decoder(
        "MixtralForCausalLM", "mixtral", 4096, 32, 32, 8, 14336, num_local_experts=8,
        num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, output_router_logits=False, router_aux_loss_coef=0.02)),
    ModelSize("qwen2-57b-a14b", "57B-A14B", _decoder(
        "Qwen2MoeForCausalLM", "qwen2_moe", 3584, 28, 28, 4, 18944, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=False, **_MOE_ROUTER)),
    ModelSize("qwen3-30b-a3b", "30B-A3B", _decoder(
        "Qwen3MoeForCausalLM", "qwen3_moe", 2048, 48, 32, 4, 6144, head_dim=128,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=False, use_sliding_window=False, tie_word_embeddings=False, **_MOE_ROUTER)),
    ModelSize("qwen3-235b-a22b", "235B-A22B", _decoder(
        "Qwen3MoeForCausalLM", "qwen3_moe", 4096, 94, 64, 4, 12288, head_dim=128,
        moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=False, use_sliding_window=False, tie_word_embeddings=False, **_MOE_ROUTER)),
    ModelSize("deepseek-v3", "671B", _decoder(
        "DeepseekV3ForCausalLM", "deepseek_v3", 7168, 61, 128, 128, 18432, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1, n_group=8,
        topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, attention_bias=False,
        vocab_size=129280, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096},
        tie_word_embeddings=False)),
)


def _family_of(model: ModelSize) -> str | None:
    try:
        return family_for_hf_config(model.hf_config).name
    except ValueError:
        return None


@functools.cache
def _by_family() -> dict[str, tuple[ModelSize, ...]]:
    table: dict[str, list[ModelSize]] = {}
    for model in MODELS:
        family = _family_of(model)
        if family is not None:
            table.setdefault(family, []).append(model)
    return {family: tuple(models) for family, models in table.items()}


def family_sizes(family: str) -> tuple[ModelSize, ...]:
    """The sizes offered for a registered ``family`` (empty if it has none)."""
    return _by_family().get(family, ())


def find_size(family: str, size: str) -> ModelSize:
    """``size`` of ``family``, by its MODEL_SIZE or model name (case-insensitive)."""
    wanted = size.lower()
    for model in family_sizes(family):
        if wanted in (model.size.lower(), model.name):
            return model
    known = [m.size for m in family_sizes(family)]
    raise ValueError(f"MODEL_SIZE={size!r} is not known for {family}; known: {known}")


def find_model(name: str) -> tuple[str, ModelSize]:
    """(family, model) for a model name such as ``qwen2.5-7b`` (case-insensitive)."""
    wanted = name.lower()
    for family, models in _by_family().items():
        for model in models:
            if model.name == wanted:
                return family, model
    known = [m.name for models in _by_family().values() for m in models]
    raise ValueError(f"model {name!r} is not known; known: {known}")


def model_size_config(family: str, size: str) -> HFConfig:
    """The HF config of ``size`` for ``family``, with a clear error listing the known sizes."""
    return find_size(family, size).hf_config
