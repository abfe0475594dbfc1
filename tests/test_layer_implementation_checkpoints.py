"""Checkpoints interchange between Transformer Engine's layer layout and the torch-native one.

Transformer Engine is not needed: its layout is written here from the torch-native model, whose
modules are given TE's ``_extra_state`` (FP8 metadata) under the names TE uses, and whose norm
keys already are TE's (``self_attention.linear_qkv.layer_norm_weight``). The loader must read
a TE-layout checkpoint into the torch-native model, and a checkpoint without extra states into a
model whose modules have them (TE's), in ``torch_dist`` and legacy ``torch`` formats.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.training.checkpointing import load_checkpoint, save_checkpoint
from megatron.training.training import get_model
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from megatron_patch.arguments import parse_training_args
from megatron_patch.models.builder import gpt_model_provider
from megatron_patch.models.common.spec import TE_COMPATIBLE_KEYS
from megatron_patch.training.checkpoint import _completed, load_megatron_checkpoint
from megatron_patch.training.initialize import initialize, teardown_parallel_state
from megatron_patch.training.pretrain import MockDataTokenizer, set_padded_vocab
from tests.launch import MOCK_DATA, TINY_MODEL

TE_PAYLOAD = torch.frombuffer(bytearray(b"fp8 scaling metadata"), dtype=torch.uint8)


class _WithExtraState:
    """Mixin giving a module Transformer Engine's ``_extra_state`` (records what it loads)."""

    def get_extra_state(self) -> torch.Tensor:
        return TE_PAYLOAD.clone()

    def set_extra_state(self, state) -> None:
        self.loaded_extra_state = state


def _te_modules(chunk: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that carry extra state under Transformer Engine's spec."""
    layers = [m for m in chunk.modules() if isinstance(m, TransformerLayer)]
    linears = [getattr(layer.self_attention, n) for layer in layers
               for n in ("linear_qkv", "linear_proj")]
    linears += [getattr(layer.mlp, n) for layer in layers for n in ("linear_fc1", "linear_fc2")]
    return [*linears, chunk.decoder.final_layernorm]


def _give_extra_state(chunk: torch.nn.Module) -> list[torch.nn.Module]:
    modules = _te_modules(chunk)
    for module in modules:
        module.__class__ = type(f"TE{type(module).__name__}", (_WithExtraState, type(module)), {})
    return modules


@pytest.fixture
def run(tmp_path):
    """One process's Megatron state for a tiny Llama, saving and loading torch_dist in tmp."""
    args = parse_training_args(TINY_MODEL + MOCK_DATA + [
        "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "1e-3",
        "--train-iters", "1", "--save", str(tmp_path / "save"), "--load", str(tmp_path / "save"),
        "--save-interval", "1", "--no-save-optim", "--no-save-rng", "--no-load-optim",
        "--no-load-rng"])
    set_padded_vocab(args, MockDataTokenizer(256))
    initialize(args)
    yield args
    teardown_parallel_state()
    torch.distributed.destroy_process_group()


def _model(args, seed: int, extra_state: bool = False) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    model = get_model(gpt_model_provider(args, transformer_engine=False),
                      ModelType.encoder_or_decoder, wrap_with_ddp=False)
    with torch.no_grad():
        for param in model[0].parameters():
            param.normal_()
    if extra_state:
        _give_extra_state(model[0])
    return model


def _same_weights(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> None:
    for (name, x), y in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert torch.equal(x, y), name


def test_te_layout_checkpoint_loads_into_torch_native_model(run):
    written = _model(run, seed=1, extra_state=True)
    save_checkpoint(1, written, None, None, 0)
    saved = set(FileSystemReader(f"{run.save}/iter_0000001").read_metadata().state_dict_metadata)
    assert "decoder.final_layernorm._extra_state/shard_0_1" in saved
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in saved
    assert not any("input_layernorm" in key for key in saved)

    loaded = _model(run, seed=2)
    load_megatron_checkpoint(loaded, None, None)
    _same_weights(written, loaded)


def test_checkpoint_without_extra_state_loads_into_te_layout_model(run):
    written = _model(run, seed=1)
    save_checkpoint(1, written, None, None, 0)

    with pytest.raises(CheckpointException, match="_extra_state"):  # Megatron's own loader
        load_checkpoint(_model(run, seed=2, extra_state=True), None, None, strict=True)
    loaded = _model(run, seed=2, extra_state=True)
    load_megatron_checkpoint(loaded, None, None)
    _same_weights(written, loaded)
    assert all(m.loaded_extra_state is None for m in _te_modules(loaded[0]))


def _to_te_names(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        for torch_name, te_name in TE_COMPATIBLE_KEYS.items():
            key = key.replace(f".{torch_name}", f".{te_name}")
        renamed[key] = value
    return renamed


def test_legacy_te_layout_checkpoint_loads_into_torch_native_model(run):
    """Megatron-LM's legacy files hold TE's norm names and extra states when TE wrote them."""
    run.ckpt_format = "torch"
    written = _model(run, seed=1, extra_state=True)
    state = _to_te_names(written[0].state_dict())
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in state
    directory = Path(run.save) / "iter_0000001" / "mp_rank_00"
    directory.mkdir(parents=True)
    torch.save({"model": state, "iteration": 1, "checkpoint_version": 3.0, "args": run},
               directory / "model_optim_rng.pt")
    (Path(run.save) / "latest_checkpointed_iteration.txt").write_text("1")

    loaded = _model(run, seed=2)
    load_megatron_checkpoint(loaded, None, None)
    _same_weights(written, loaded)


def test_legacy_names_complete_either_way():
    """A torch-native legacy state dict read by a TE model: norms renamed, extra states None."""
    torch_state = {"decoder.layers.0.input_layernorm.weight": 1,
                   "decoder.layers.0.pre_mlp_layernorm.weight": 2, "output_layer.weight": 3}
    te_names = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                "decoder.layers.0.self_attention.linear_qkv._extra_state",
                "decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "output_layer.weight"]
    assert _completed(torch_state, te_names) == {
        te_names[0]: 1, te_names[1]: None, te_names[2]: 2, "output_layer.weight": 3}
    assert _completed(_to_te_names(torch_state), list(torch_state)) == torch_state
