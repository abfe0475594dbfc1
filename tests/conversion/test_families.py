"""Family registry and the HF config <-> Megatron argument mapping (no model is built)."""

import argparse
import copy

import pytest
import transformers

from megatron_patch.mapping.config import UnsupportedConfigError
from megatron_patch.models.common.hf_config import load_hf_config
from megatron_patch.models.registry import family_for_hf_config, registered_families
from tests.conversion.tiny_models import CASES


def test_dense_families_are_registered():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(registered_families())
    for arch, family in [("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral"),
                         ("Qwen2ForCausalLM", "qwen2"), ("Qwen3ForCausalLM", "qwen3")]:
        assert family_for_hf_config({"architectures": [arch]}).name == family


EXPECTED = {
    "llama3": {"use_rope_scaling": True, "rope_scaling_factor": 8.0, "rotary_base": 500000,
               "untie_embeddings_and_output_weights": False, "vocab_size": 251,
               "num_query_groups": 2, "group_query_attention": True},
    "llama_mqa": {"num_query_groups": 1, "kv_channels": 16, "window_size": None},
    "mistral": {"window_size": (7, 0), "untie_embeddings_and_output_weights": True},
    "qwen2": {"add_qkv_bias": True, "qk_layernorm": False, "window_size": None,
              "untie_embeddings_and_output_weights": False},
    "qwen3": {"kv_channels": 32, "qk_layernorm": True, "add_qkv_bias": False,
              "num_attention_heads": 4, "hidden_size": 64},
    "bloom": {"alibi": True, "position_embedding_type": "none", "embedding_layernorm": True,
              "mlp_activation": "gelu_tanh", "add_bias_linear": True, "ffn_hidden_size": 256,
              "normalization": "LayerNorm", "untie_embeddings_and_output_weights": False},
    "falcon_mqa": {"num_query_groups": 1, "parallel_attention_mlp": True,
                   "parallel_attention_norms": 1, "add_bias_linear": False,
                   "mlp_activation": "gelu", "position_embedding_type": "rope"},
    "falcon_gqa": {"num_query_groups": 2, "parallel_attention_mlp": True,
                   "parallel_attention_norms": 2, "untie_embeddings_and_output_weights": True},
    "starcoder_mqa": {"num_query_groups": 1, "position_embedding_type": "learned_absolute",
                      "max_position_embeddings": 64, "mlp_activation": "gelu_tanh",
                      "add_bias_linear": True},
    "starcoder2": {"num_query_groups": 2, "window_size": (7, 0), "add_bias_linear": True,
                   "normalization": "LayerNorm", "mlp_activation": "gelu_tanh"},
    "glm": {"rotary_percent": 0.5, "rotary_interleaved": True, "rotary_base": 20000,
            "add_qkv_bias": True, "add_bias_linear": False, "kv_channels": 32,
            "post_sublayer_norms": False},
    "glm4": {"post_sublayer_norms": True, "rotary_interleaved": True},
    "galactica": {"position_id_offset": 2, "position_embedding_type": "learned_absolute",
                  "mlp_activation": "gelu", "ffn_hidden_size": 96, "add_bias_linear": True},
    "qwen2_moe": {"num_experts": 4, "moe_router_topk": 2, "moe_router_pre_softmax": True,
                  "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 48,
                  "moe_shared_expert_gate": True, "moe_layer_freq": [1, 0, 1, 1],
                  "add_qkv_bias": True},
    "mixtral": {"num_experts": 4, "moe_router_pre_softmax": False, "moe_ffn_hidden_size": 48,
                "moe_layer_freq": 1, "moe_shared_expert_intermediate_size": None,
                "moe_router_score_function": "softmax"},
    "qwen3_moe": {"num_experts": 8, "moe_router_pre_softmax": False, "qk_layernorm": True,
                  "kv_channels": 32, "untie_embeddings_and_output_weights": False},
    "deepseek_v3": {"multi_latent_attention": True, "q_lora_rank": 48, "kv_lora_rank": 32,
                    "qk_head_dim": 16, "qk_pos_emb_head_dim": 16, "v_head_dim": 16,
                    "rope_type": "yarn", "rotary_scaling_factor": 4.0, "mscale_all_dim": 1.0,
                    "moe_router_score_function": "sigmoid", "moe_router_num_groups": 4,
                    "moe_router_group_topk": 2, "moe_router_enable_expert_bias": True,
                    "moe_router_topk_scaling_factor": 2.5, "moe_layer_freq": [0, 1, 1, 1],
                    "moe_shared_expert_intermediate_size": 16, "moe_shared_expert_gate": False},
    "deepseek_v2_lite": {"q_lora_rank": None, "rope_type": "yarn", "mscale_all_dim": 0.707,
                         "moe_router_score_function": "softmax", "moe_router_pre_softmax": True,
                         "moe_router_topk_scaling_factor": 1.5, "moe_router_num_groups": None,
                         "moe_shared_expert_intermediate_size": 32},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_to_megatron_and_back(hf_models, case):
    hf = load_hf_config(hf_models[case])
    family = family_for_hf_config(hf)
    megatron = family.hf_to_megatron(hf)
    for key, value in EXPECTED[case].items():
        assert megatron[key] == value, key
    back = family.megatron_to_hf(argparse.Namespace(**megatron))
    assert back["architectures"] == hf["architectures"]
    assert family.hf_to_megatron(back) == megatron
    # The regenerated config builds the same HF model (same parameter shapes).
    config_class = CASES[case][0]
    shapes = {n: p.shape for n, p in transformers.AutoModelForCausalLM.from_config(
        config_class(**back)).named_parameters()}
    original = {n: p.shape for n, p in transformers.AutoModelForCausalLM.from_config(
        config_class(**hf)).named_parameters()}
    assert shapes == original


def _mistral(**fields):
    return {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100,
            "max_position_embeddings": 64, **fields}


@pytest.mark.parametrize("window, expected", [(None, None), (64, None), (1000, None),
                                              (63, (62, 0))])
def test_mistral_window_is_a_no_op_unless_shorter_than_the_context(window, expected):
    hf = _mistral(sliding_window=window)
    assert family_for_hf_config(hf).hf_to_megatron(hf)["window_size"] == expected


def test_qwen_window_follows_use_sliding_window_and_layer_types():
    qwen = {**_mistral(sliding_window=8), "architectures": ["Qwen3ForCausalLM"]}
    family = family_for_hf_config(qwen)
    assert family.hf_to_megatron({**qwen, "use_sliding_window": False,
                                  "layer_types": ["sliding_attention"] * 2})["window_size"] is None
    assert family.hf_to_megatron({**qwen, "use_sliding_window": True,
                                  "max_window_layers": 0})["window_size"] == (7, 0)
    with pytest.raises(UnsupportedConfigError, match="layer_types"):
        family.hf_to_megatron({**qwen, "use_sliding_window": True,
                               "layer_types": ["full_attention", "sliding_attention"]})


LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100}


@pytest.mark.parametrize("fields, named", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "su", "factor": 4.0}}, "rope type 'su'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "high_freq_factor"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_unsupported_config_names_the_field(fields, named):
    hf = copy.deepcopy({**LLAMA, **fields})
    with pytest.raises(UnsupportedConfigError, match=named):
        family_for_hf_config(hf).hf_to_megatron(hf)


def test_unknown_architecture_names_the_field():
    with pytest.raises(ValueError, match="architectures"):
        family_for_hf_config({"architectures": ["GPT2LMHeadModel"]})
