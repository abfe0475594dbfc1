"""The shared architecture mechanisms and the config mappers of the non-llama families.

ALiBi slopes and biases are checked against transformers' Bloom ALiBi; logits-level parity of
every family is in test_parity.py / test_remote_code.py.
"""

import argparse
import copy

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from megatron_patch.mapping.config import UnsupportedConfigError
from megatron_patch.models.common.alibi import alibi_bias, alibi_slopes
from megatron_patch.models.common.architecture import PatchTransformerConfig
from megatron_patch.models.registry import family_for_hf_config, get_family


@pytest.mark.parametrize("heads", [1, 2, 4, 5, 12, 16, 40, 71, 112])
def test_alibi_matches_bloom(heads):
    """Same attention weights as transformers' Bloom ALiBi (which adds slope * j): our
    slope * (j - i) differs from it by a constant per query row."""
    length = 9
    theirs = build_alibi_tensor(torch.ones(1, length), heads, torch.float32).view(heads, length)
    ours = alibi_bias(alibi_slopes(heads), torch.arange(length), torch.arange(length))
    assert torch.allclose(ours[:, 0, :], theirs, rtol=1e-6, atol=0)  # row i = 0: slope * j
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mine = torch.softmax(ours.masked_fill(~causal, float("-inf")), dim=-1)
    bloom = torch.softmax((theirs[:, None, :].expand(-1, length, -1)).masked_fill(
        ~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(mine, bloom, rtol=1e-6, atol=1e-7)


def test_alibi_bias_for_queries_after_a_cache():
    """With 3 queries after 5 cached keys the queries sit at positions 5..7."""
    bias = alibi_bias(torch.tensor([0.5]), torch.arange(5, 8), torch.arange(8))
    assert bias.shape == (1, 3, 8)
    assert bias[0, 0, 5] == 0 and bias[0, 2, 0] == -3.5 and bias[0, 0, 7] == 1.0


def _config(**switches):
    return PatchTransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                  **switches)


def test_mlp_activation_replaces_the_fused_gelu():
    config = _config(mlp_activation="gelu_tanh", bias_activation_fusion=True,
                     add_bias_linear=True)
    assert not config.bias_activation_fusion
    x = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(config.activation_func(x), torch.nn.functional.gelu(
        x, approximate="tanh"))
    with pytest.raises(ValueError, match="mlp_activation"):
        _config(mlp_activation="swish")
    with pytest.raises(ValueError, match="non-gated"):
        _config(mlp_activation="relu", gated_linear_unit=True)


GLM = {"architectures": ["GlmForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 32, "vocab_size": 100, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
       "attention_bias": True, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0,
                                                   "partial_rotary_factor": 0.5}}
CHATGLM = {"architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": 64,
           "ffn_hidden_size": 96, "kv_channels": 32, "num_attention_heads": 4,
           "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 100,
           "seq_length": 64, "layernorm_epsilon": 1e-5, "rope_ratio": 2, "rmsnorm": True,
           "add_qkv_bias": True, "post_layer_norm": True, "add_bias_linear": False}
BAICHUAN2_13B = {"architectures": ["BaichuanForCausalLM"], "hidden_size": 64,
                 "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 2,
                 "rms_norm_eps": 1e-6, "vocab_size": 100, "hidden_act": "silu",
                 "model_max_length": 128, "z_loss_weight": 0}


def test_chatglm_config_is_the_glm_model():
    """ChatGLM2/3's own config maps to the Megatron model of the equivalent GlmForCausalLM."""
    glm = get_family("glm").hf_to_megatron(GLM)
    chatglm = family_for_hf_config(CHATGLM).hf_to_megatron(CHATGLM)
    assert family_for_hf_config(CHATGLM).name == "chatglm"
    architecture = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "kv_channels", "normalization", "swiglu",
                    "add_bias_linear", "add_qkv_bias", "rotary_base", "rotary_percent",
                    "rotary_interleaved", "position_embedding_type",
                    "untie_embeddings_and_output_weights", "vocab_size")
    assert {k: chatglm[k] for k in architecture} == {k: glm[k] for k in architecture}


@pytest.mark.parametrize("hf, expected", [
    (BAICHUAN2_13B, {"alibi": True, "position_embedding_type": "none", "lm_head_norm": True,
                     "max_position_embeddings": 128, "num_query_groups": 4}),
    ({**BAICHUAN2_13B, "architectures": ["BaiChuanForCausalLM"], "max_position_embeddings": 64,
      "z_loss_weight": None}, {"lm_head_norm": True, "position_embedding_type": "rope"}),
    ({k: v for k, v in BAICHUAN2_13B.items() if k != "z_loss_weight"},
     {"lm_head_norm": False, "alibi": True}),
    (CHATGLM, {"rotary_base": 20000, "num_query_groups": 2, "max_position_embeddings": 64}),
])
def test_remote_code_configs_round_trip(hf, expected):
    family = family_for_hf_config(hf)
    megatron = family.hf_to_megatron(hf)
    for key, value in expected.items():
        assert megatron[key] == value, key
    assert family.hf_to_megatron(family.megatron_to_hf(argparse.Namespace(**megatron))) == megatron


@pytest.mark.parametrize("hf, named", [
    ({"architectures": ["FalconForCausalLM"], "alibi": True}, "alibi"),
    ({"architectures": ["FalconForCausalLM"], "activation": "relu"}, "activation"),
    ({"architectures": ["FalconForCausalLM"], "new_decoder_architecture": True,
      "parallel_attn": False}, "parallel_attn"),
    ({"architectures": ["BloomForCausalLM"], "apply_residual_connection_post_layernorm": True},
     "apply_residual_connection_post_layernorm"),
    ({"architectures": ["GPTBigCodeForCausalLM"], "scale_attn_weights": False},
     "scale_attn_weights"),
    ({"architectures": ["GPTBigCodeForCausalLM"], "activation_function": "silu"},
     "activation_function"),
    ({"architectures": ["OPTForCausalLM"], "do_layer_norm_before": False},
     "do_layer_norm_before"),
    ({"architectures": ["OPTForCausalLM"], "hidden_size": 64, "word_embed_proj_dim": 32},
     "word_embed_proj_dim"),
    ({**CHATGLM, "pre_seq_len": 8}, "pre_seq_len"),
    ({**CHATGLM, "multi_query_group_num": 4}, "multi_query_group_num"),
    ({**BAICHUAN2_13B, "z_loss_weight": 1e-4}, "z_loss_weight"),
    ({"architectures": ["Starcoder2ForCausalLM"], "hidden_size": 64}, "num_attention_heads"),
])
def test_unsupported_config_names_the_field(hf, named):
    with pytest.raises(UnsupportedConfigError, match=named):
        family_for_hf_config(hf).hf_to_megatron(copy.deepcopy(hf))
