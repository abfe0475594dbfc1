"""Megatron ``torch_dist`` checkpoints, written and read without holding the whole model.

Writing goes through ``megatron.core.dist_checkpointing.save`` (so the common state, content
metadata and ``metadata.json`` are Megatron's own) with a save strategy whose planner produces
each tensor only when the PyTorch DCP writer asks for it, in layer order. Reading asks
``dist_checkpointing.load`` for one layer at a time. A ``torch_dist`` checkpoint stores global
(unsharded) tensors, so one written here loads at any TP/PP/VPP and any checkpoint saved by
training (at any layout) reads back here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from tqdm import tqdm

from megatron_patch.conversion.engine import ConversionError, check_keys
from megatron_patch.conversion.layout import EMBEDDING, MegatronLayout

# What training writes for a model without a distributed optimizer
# (megatron.training.checkpointing._build_sharded_state_dict_metadata).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}

TensorSource = Callable[[str], torch.Tensor]
# PyTorch DCP's notices for single-process use and Megatron's (torch) ShardedTensor path.
_DCP_NOTICES = ("torch.distributed is disabled", "The argument order of load",
                "Please use DTensor instead")


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    with warnings.catch_warnings():
        for notice in _DCP_NOTICES:
            warnings.filterwarnings("ignore", message=notice)
        yield


class _ChunkIndex:
    """Where each layout parameter lives in a checkpoint: its key, and its position along the
    axes prepended to keys that stack all layers (``decoder.layers.mlp.linear_fc2.weight``:
    the layer) or all layers and experts (``decoder.layers.mlp.experts.experts.linear_fc1.
    weight``: layer, expert)."""

    def __init__(self, layout: MegatronLayout):
        sharded = layout.model.sharded_state_dict()
        apply_factories(sharded)
        self.order = {name: i for i, group in enumerate(layout.groups()) for name in group}
        self.names: dict[tuple[str, tuple[int, ...]], str] = {}
        self.location: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.prepend: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.sharded = sharded
        for name, entry in sharded.items():
            for tensor in nested_values({name: entry}):
                if isinstance(tensor, ShardedTensor):
                    stacked = tuple(tensor.global_offset[:tensor.prepend_axis_num])
                    self.names[(tensor.key, stacked)] = name
                    self.location[name] = (tensor.key, stacked)
                    self.prepend[tensor.key] = tensor.prepend_axis_num
                    self.shapes[tensor.key] = tuple(tensor.global_shape)

    def locate(self, item: WriteItem) -> tuple[str, int]:
        """(parameter name, prepended axes) of a DCP write item."""
        fqn, offset = item.index.fqn, item.index.offset
        prepend = self.prepend[fqn]
        return self.names[(fqn, tuple(offset[:prepend]))], prepend

    def position(self, item: WriteItem) -> int:
        """Streaming position of an item: objects first, then tensors layer by layer."""
        if item.type == WriteItemType.BYTE_IO:
            return -1
        return self.order[self.locate(item)[0]]


class _StreamingPlanner(MCoreSavePlanner):
    """MCore's planner, producing each tensor on request (and items in layer order)."""

    def __init__(self, index: _ChunkIndex, source: TensorSource, progress: bool):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.index = index
        self.source = source
        self.progress = progress
        self._cached: tuple[str | None, torch.Tensor | None] = (None, None)
        self._bar: tqdm | None = None

    def create_local_plan(self) -> SavePlan:
        """The local plan with items sorted into streaming order."""
        plan = super().create_local_plan()
        items = sorted(plan.items, key=self.index.position)
        self.plan = dataclasses.replace(plan, items=items)
        tensors = sum(item.type != WriteItemType.BYTE_IO for item in items)
        self._bar = tqdm(total=tensors, desc="writing torch_dist", unit="tensor",
                         disable=not self.progress)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        """Build the requested chunk of a parameter from the source (one parameter cached)."""
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        name, prepend = self.index.locate(write_item)
        if self._cached[0] != name:
            self._cached = (None, None)
            self._cached = (name, self.source(name))
        full = self._cached[1]
        offsets, sizes = write_item.index.offset, write_item.tensor_data.chunk.sizes
        chunk = full[tuple(slice(o, o + s) for o, s in zip(offsets[prepend:], sizes[prepend:]))]
        self._bar.update()
        return chunk.reshape(sizes).to(write_item.tensor_data.properties.dtype).contiguous()

    def close(self) -> None:
        """Close the progress bar and drop the cached parameter."""
        if self._bar is not None:
            self._bar.close()
        self._cached = (None, None)


class _StreamingStrategy(TorchDistSaveShardedStrategy):
    """Synchronous single-process torch_dist save through :class:`_StreamingPlanner`."""

    def __init__(self, planner: _StreamingPlanner):
        super().__init__()
        self.planner = planner

    def save(self, sharded_state_dict: dict, checkpoint_dir: Path) -> None:
        """Write the DCP files of ``sharded_state_dict`` into ``checkpoint_dir``."""
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        writer = FileSystemWriter(checkpoint_dir, thread_count=1, single_file_per_rank=True)
        try:
            with _quiet_dcp():
                dcp_save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer,
                         planner=self.planner, no_dist=True)
        finally:
            self.planner.close()


def save_torch_dist(layout: MegatronLayout, directory: Path, source: TensorSource,
                    common: dict, progress: bool = True,
                    keys: Callable[[str], bool] | None = None) -> None:
    """Write the layout model's checkpoint, taking each unsharded parameter from ``source``;
    only the parameters whose names ``keys`` accepts when given (e.g. LoRA adapters)."""
    index = _ChunkIndex(layout)
    planner = _StreamingPlanner(index, source, progress)
    model = {name: entry for name, entry in index.sharded.items() if keys is None or keys(name)}
    dist_checkpointing.save({**common, "model": model}, str(directory),
                            sharded_strategy=_StreamingStrategy(planner),
                            content_metadata=dict(CONTENT_METADATA))


class TorchDistCheckpoint:
    """A ``torch_dist`` checkpoint directory: its saved args and its model tensors."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        with _quiet_dcp():
            self.common = dist_checkpointing.load_common_state_dict(str(self.directory))
            self.tensors = dist_checkpointing.load_tensors_metadata(str(self.directory))
        self._index: _ChunkIndex | None = None

    @property
    def args(self):
        """The Megatron args saved with the checkpoint (None if absent)."""
        return self.common.get("args")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (that of the embedding)."""
        return self.tensors[EMBEDDING].dtype

    def check(self, layout: MegatronLayout, keys: Callable[[str], bool] | None = None) -> None:
        """Strict check: the checkpoint holds exactly the layout's model tensors and shapes
        (those whose checkpoint keys ``keys`` accepts, when given)."""
        self._index = _ChunkIndex(layout)
        expected = {key: shape for key, shape in self._index.shapes.items()
                    if keys is None or keys(key)}
        roots = {key.split(".")[0] for key in expected}
        found = {key: tuple(meta.global_shape) for key, meta in self.tensors.items()
                 if key.split(".")[0] in roots and (keys is None or keys(key))}
        check_keys(expected, found, f"{self.directory} (model tensors)")
        for key, shape in expected.items():
            if found[key] != shape:
                raise ConversionError(f"{self.directory}: {key!r} has shape {found[key]}, the "
                                      f"model expects {shape}")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The unsharded tensors of layout parameters ``names`` (dtype as stored); call
        :meth:`check` first. A layer's (expert's) slice of a stacked key is read on its own."""
        request, stacked = {}, {}
        for name in names:
            key, positions = self._index.location[name]
            meta = self.tensors[key]
            axes = len(positions)
            data = torch.empty((1,) * axes + tuple(meta.global_shape[axes:]), dtype=meta.dtype)
            offsets = [(axis, index, meta.global_shape[axis])
                       for axis, index in enumerate(positions)]
            request[name] = ShardedTensor.from_rank_offsets(key, data, *offsets)
            stacked[name] = axes
        with _quiet_dcp():
            loaded = dist_checkpointing.load(request, str(self.directory),
                                             validate_access_integrity=False)
        return {name: loaded[name].reshape(loaded[name].shape[axes:])
                for name, axes in stacked.items()}
