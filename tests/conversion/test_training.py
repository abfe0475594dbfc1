"""Training starts from converted checkpoints at another layout, and its checkpoints convert back.

The training entry is driven as in tests/test_parallel_parity.py: ``--load M`` alone brings the
architecture (from ``megatron_patch.json``); the checkpoint is a ``release`` one, so Megatron
loads only the weights (no optimizer, scheduler or RNG state) and starts at iteration 0.
"""

import pytest
import torch

from megatron_patch.conversion import convert_hf_to_mcore, convert_mcore_to_hf
from tests.conversion.tiny_models import read_safetensors
from tests.launch import pretrain

TRAIN = ["--dataset", "mock", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1",
         "--eval-iters", "0", "--seed", "7", "--attention-dropout", "0", "--hidden-dropout", "0"]


@pytest.fixture(scope="module")
def reference(converted) -> dict[int, float]:
    """Losses of the TP=1 checkpoint trained in one process."""
    return pretrain(TRAIN + ["--lr", "1e-3", "--load", str(converted["qwen2"])], nproc=1)


@pytest.mark.distributed
def test_converted_at_tp1_trains_at_tp2_pp2_with_the_same_loss(converted, hf_models, reference,
                                                               tmp_path):
    got = pretrain(TRAIN + ["--lr", "1e-3", "--load", str(converted["qwen2"]),
                            "--tensor-model-parallel-size", "2",
                            "--pipeline-model-parallel-size", "2"], nproc=4)
    assert got[1] == pytest.approx(reference[1], rel=1e-5), (got, reference)
    assert got[2] == pytest.approx(reference[2], rel=1e-4), (got, reference)
    scratch = pretrain(TRAIN + ["--lr", "1e-3", "--hf-config-path", str(hf_models["qwen2"])])
    assert scratch[1] != pytest.approx(reference[1], rel=1e-3), "weights were not loaded"


@pytest.mark.distributed
def test_legacy_checkpoint_trains_at_its_own_layout(hf_models, reference, tmp_path):
    legacy = convert_hf_to_mcore(hf_models["qwen2"], tmp_path / "legacy", pp=2, vpp=2,
                                 ckpt_format="legacy", progress=False)
    got = pretrain(TRAIN + ["--lr", "1e-3", "--load", str(legacy)], nproc=2)
    assert got[1] == pytest.approx(reference[1], rel=1e-5), (got, reference)


@pytest.mark.distributed
def test_checkpoint_saved_by_training_at_tp2_pp2_converts_back(converted, hf_models, tmp_path,
                                                               capsys):
    """With lr 0 the weights do not move, so the HF export equals the original bit for bit.

    The training checkpoint has no conversion metadata and holds optimizer state: the
    architecture, family and vocabulary come from the Megatron args saved in it.
    """
    from transformers import AutoModelForCausalLM

    saved = tmp_path / "trained"
    pretrain(TRAIN + ["--lr", "0", "--min-lr", "0", "--load", str(converted["qwen2"]),
                      "--save", str(saved), "--save-interval", "2",
                      "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
             nproc=4)
    assert (saved / "iter_0000002").is_dir()
    back = convert_mcore_to_hf(saved, tmp_path / "hf", progress=False)
    # trained on mock data: no tokenizer to write, and the conversion says so
    assert "note: no tokenizer written" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(back).config.tie_word_embeddings
    original, exported = read_safetensors(hf_models["qwen2"]), read_safetensors(back)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
