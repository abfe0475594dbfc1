"""Impossible configurations stop at argument parsing, with the flags to change in the message."""

import json

import pytest

from megatron_patch.arguments import parse_training_args
from megatron_patch.config_checks import ConfigError
from megatron_patch.mapping.config import UnsupportedConfigError
from megatron_patch.models.common.head_split import kv_split_problem
from tests.launch import MOCK_DATA, TINY_MODEL

BASE = TINY_MODEL + MOCK_DATA + ["--micro-batch-size", "1", "--global-batch-size", "4",
                                 "--train-iters", "2"]


@pytest.mark.parametrize("world, flags, message", [
    (2, ["--tensor-model-parallel-size", "4"],
     "2 processes are not divisible by --tensor-model-parallel-size 4"),
    (2, ["--tensor-model-parallel-size", "2", "--num-attention-heads", "6",
         "--num-query-groups", "3", "--kv-channels", "16"],
     "--tensor-model-parallel-size 2 with --num-query-groups 3: 3 key/value heads cannot be "
     "shared out over 2 ranks"),
    (2, ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3",
         "--num-query-groups", "3"],
     "--tensor-model-parallel-size 2 must divide --num-attention-heads 3"),
    (2, ["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "129"],
     "--tensor-model-parallel-size 2 must divide --ffn-hidden-size 129"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
     "--pipeline-model-parallel-size 2 must divide --num-layers 3"),
    (1, ["--num-virtual-stages-per-pipeline-rank", "2"],
     "needs --pipeline-model-parallel-size > 1"),
    (2, ["--global-batch-size", "3"],
     "--global-batch-size 3 must be a multiple of --micro-batch-size 1 x 2 data-parallel"),
    (1, ["--hidden-size", "66"], "--num-attention-heads 4 must divide --hidden-size 66"),
    (1, ["--num-query-groups", "3"], "--num-query-groups 3 must divide --num-attention-heads 4"),
    (1, ["--async-save", "--save", "ckpt"], "--async-save is not supported"),
])
def test_invalid_parallel_and_loop_flags(monkeypatch, world, flags, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match="invalid training configuration") as caught:
        parse_training_args(BASE + flags)
    assert message in str(caught.value)


def test_fewer_key_value_heads_than_tensor_parallel_ranks_are_accepted(monkeypatch):
    """Multi-query attention at TP=2: each rank uses the one key/value head whole."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_training_args(BASE + ["--tensor-model-parallel-size", "2",
                                       "--num-query-groups", "1"])
    assert (args.tensor_model_parallel_size, args.num_query_groups) == (2, 1)


def test_key_value_head_split_rule():
    assert kv_split_problem(48, 1, 128, 8) is None  # StarCoder at TP=8
    assert kv_split_problem(8, 4, 16, 2) is None  # groups split over the ranks
    assert "3 key/value heads cannot be shared out over 2 ranks" in kv_split_problem(6, 3, 16, 2)
    assert "18 rows" in kv_split_problem(4, 1, 3, 4)  # (4 + 2) x 3 rows over 4 ranks


def _hf_dir(tmp_path, **overrides):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 256,
              "rms_norm_eps": 1e-5, **overrides}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("overrides, error, message", [
    ({"architectures": ["FancyForCausalLM"]}, ValueError,
     "'architectures'=['FancyForCausalLM'] is not supported"),
    ({"hidden_act": "gelu"}, UnsupportedConfigError, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn"}}, UnsupportedConfigError,
     "rope yarn needs 'factor'"),
    ({"num_hidden_layers": None}, UnsupportedConfigError,
     "required field 'num_hidden_layers' is missing"),
])
def test_unsupported_hf_config(tmp_path, overrides, error, message):
    with pytest.raises(error) as caught:
        parse_training_args(["--hf-config-path", _hf_dir(tmp_path, **overrides),
                             "--micro-batch-size", "1", "--train-iters", "1"])
    assert message in str(caught.value)


def test_corrupt_hf_config(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": [')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        parse_training_args(["--hf-config-path", str(tmp_path), "--micro-batch-size", "1"])
