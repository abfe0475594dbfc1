"""Damaged, incomplete or foreign checkpoints fail before loading, naming the file and the problem.

The checkpoint is the reference run's (torch_dist, 2 ranks, ``--verify-integrity``), copied and
then damaged; "this run" is parsed from the same flags as a real resume would be.
"""

import argparse
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing.validation import verify_integrity_manifest

from megatron_patch.arguments import parse_training_args
from megatron_patch.training.checkpoint import CheckpointError, check_checkpoint_before_load
from megatron_patch.training.pretrain import MockDataTokenizer, set_padded_vocab
from tests.conversion.tiny_models import save_tiny_model, save_tokenizer
from tests.reliability.jobs import TRAIN

ITER = "iter_0000010"


@pytest.fixture
def checkpoint(reference, tmp_path) -> Path:
    """A private copy of the reference run's last checkpoint."""
    load = tmp_path / "ckpt"
    shutil.copytree(reference.save_dir / ITER, load / ITER)
    (load / "latest_checkpointed_iteration.txt").write_text("10")
    return load


def run_args(load: Path, *flags: str, tokens: int = 256) -> argparse.Namespace:
    """This run's arguments, as the pretrain entry point has them when it checks ``--load``."""
    args = parse_training_args(TRAIN + ["--load", str(load), *flags])
    set_padded_vocab(args, MockDataTokenizer(tokens))
    return args


def expect_error(args: argparse.Namespace, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint_before_load(args)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_intact_checkpoint_passes(checkpoint):
    assert check_checkpoint_before_load(run_args(checkpoint)) == checkpoint / ITER


def test_no_tracker_starts_from_scratch(tmp_path):
    assert check_checkpoint_before_load(run_args(tmp_path / "new")) is None


def test_truncated_shard(checkpoint):
    shard = checkpoint / ITER / "__1_0.distcp"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    expect_error(run_args(checkpoint), str(shard), "truncated", "extend to byte")


def test_missing_shard(checkpoint):
    (checkpoint / ITER / "__0_0.distcp").unlink()
    expect_error(run_args(checkpoint), "1 of its 2 shard files are missing: __0_0.distcp")


def test_corrupt_metadata(checkpoint):
    (checkpoint / ITER / ".metadata").write_bytes(b"\x80\x04garbage")
    expect_error(run_args(checkpoint), str(checkpoint / ITER / ".metadata"), "unreadable")


def test_corrupt_common_state(checkpoint):
    """The pickled arguments/iteration inside a shard: found through the shard's index."""
    directory = checkpoint / ITER
    metadata = pickle.loads((directory / ".metadata").read_bytes())
    common = next(info for index, info in metadata.storage_data.items()
                  if "common_state" in index.fqn)
    with open(directory / common.relative_path, "r+b") as handle:
        handle.seek(common.offset)
        handle.write(b"\0" * common.length)
    expect_error(run_args(checkpoint), "common state", "unreadable")


def test_flipped_bit_fails_integrity_manifest(checkpoint):
    """Bit rot inside a tensor: caught by Megatron-Core's --verify-integrity manifest."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    shard = checkpoint / ITER / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    check_checkpoint_before_load(run_args(checkpoint))  # the layout is intact
    with pytest.raises(CheckpointingException, match="__1_0.distcp: hash mismatch"):
        verify_integrity_manifest(str(checkpoint / ITER))


def test_corrupt_tracker(checkpoint):
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("\x00\x00")
    expect_error(run_args(checkpoint), "latest_checkpointed_iteration.txt",
                 "expected an iteration number or 'release'")


def test_tracker_names_missing_checkpoint(checkpoint):
    (checkpoint / "latest_checkpointed_iteration.txt").write_text("12")
    expect_error(run_args(checkpoint), "iter_0000012 does not exist")


def test_different_shape(checkpoint):
    expect_error(run_args(checkpoint, "--hidden-size", "128"),
                 "holds a different model", "hidden_size=64 (this run: 128)")


def test_different_family(checkpoint):
    args = run_args(checkpoint)
    args.model_family = "qwen2"
    expect_error(args, "model_family='llama' (this run: 'qwen2')")


def test_vocabulary_mismatch(checkpoint):
    expect_error(run_args(checkpoint, tokens=300), "vocabulary mismatch",
                 "256 embedding rows", "(384 rows)")


def test_other_tokenizer_of_same_padded_size(checkpoint):
    """250 tokens pad to the same 256 rows: an error, only a warning when fine-tuning."""
    expect_error(run_args(checkpoint, tokens=250), "vocabulary mismatch",
                 "256 tokens", "250 tokens", "--finetune")
    assert check_checkpoint_before_load(run_args(checkpoint, "--finetune", tokens=250))


@pytest.fixture(scope="module")
def converted_legacy(tmp_path_factory) -> Path:
    """A llama HF model (240-token tokenizer) converted to a legacy TP=2 checkpoint."""
    from megatron_patch.conversion import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("legacy")
    hf = save_tiny_model("llama3", root / "hf")
    save_tokenizer(hf, 240)
    return convert_hf_to_mcore(hf, root / "mcore", tp=2, ckpt_format="legacy", progress=False)


def legacy_args(load: Path, tokens: int) -> argparse.Namespace:
    """The converted checkpoint's own arguments, with this run's tokenizer."""
    saved = torch.load(load / "release" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=False, mmap=True)["args"]
    return argparse.Namespace(**{**vars(saved), "load": str(load), "ckpt_step": None,
                                 "finetune": False, "patch_tokenizer_type": "HFTokenizer",
                                 "patch_tokenizer_path": "tok", "tokenizer_vocab_size": tokens})


def test_legacy_checks(converted_legacy, tmp_path):
    load = tmp_path / "mcore"
    shutil.copytree(converted_legacy, load)
    assert check_checkpoint_before_load(legacy_args(load, 240)) == load / "release"
    expect_error(legacy_args(load, 239), "converted with a tokenizer of 240 tokens",
                 "239 tokens")
    shard = load / "release" / "mp_rank_01" / "model_optim_rng.pt"
    with open(shard, "r+b") as handle:
        handle.truncate(100)
    expect_error(legacy_args(load, 240), str(shard), "not a readable torch.save archive")
    shutil.rmtree(shard.parent)
    expect_error(legacy_args(load, 240), "saved at TP=2 PP=1", "mp_rank_01")
