"""Megatron's legacy ``torch`` checkpoint format: one ``model_optim_rng.pt`` per TP/PP rank.

``release/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`` holds that rank's model chunk(s)
(``model``, or ``model0``, ``model1``, ... with virtual pipeline stages) under local parameter
names. Unlike ``torch_dist`` the layout is baked in: train at the TP/PP/VPP it was written with.
Names are those of the torch-native layer spec (Transformer Engine names its layers differently).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_patch.conversion.engine import ConversionError, check_keys
from megatron_patch.conversion.layout import (
    EMBEDDING,
    POST_PROCESS_PREFIXES,
    PRE_PROCESS_PREFIXES,
    Chunk,
    MegatronLayout,
    layer_index,
    with_layer,
)
from megatron_patch.conversion.sharding import is_gated_fc1, tp_shard, tp_unshard

CHECKPOINT_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_OUTPUT = "output_layer.weight"


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron's per-rank directory name."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _local_name(name: str, chunk: Chunk) -> str | None:
    """``name`` inside ``chunk`` (layer renumbered), or None if the chunk does not hold it."""
    layer = layer_index(name)
    if layer is not None:
        local = layer - chunk.first_layer
        return with_layer(name, local) if 0 <= local < chunk.num_layers else None
    if name.startswith(PRE_PROCESS_PREFIXES):
        return name if chunk.pre_process else None
    if name.startswith(POST_PROCESS_PREFIXES):
        return name if chunk.post_process else None
    raise ConversionError(f"cannot place Megatron state {name!r} in a pipeline stage")


def _split(layout: MegatronLayout, name: str, full: torch.Tensor, tp: int) -> list:
    param = layout.parameters[name]
    if not getattr(param, "tensor_model_parallel", False):
        return [full] * tp
    gated = is_gated_fc1(name, layout.config.gated_linear_unit)
    return [tp_shard(full, param.partition_dim, rank, tp, gated).clone() for rank in range(tp)]


def save_legacy(layout: MegatronLayout, directory: Path, source: Callable[[str], torch.Tensor],
                common: dict, chunks: list[Chunk], tp: int, progress: bool = True) -> None:
    """Write every rank's file, one pipeline rank at a time (peak memory: one stage)."""
    state = layout.model.state_dict(keep_vars=True)  # parameters and (None) extra states
    params = layout.parameters
    pp = max(chunk.pp_rank for chunk in chunks) + 1
    bar = tqdm(total=len(params), desc="writing legacy", unit="param", disable=not progress)
    for pp_rank in range(pp):
        files = [dict(common) for _ in range(tp)]
        for chunk in (c for c in chunks if c.pp_rank == pp_rank):
            models: list[dict] = [{} for _ in range(tp)]
            for name, value in state.items():
                local = _local_name(name, chunk)
                if local is None:
                    continue
                if name in params:
                    pieces = _split(layout, name, source(name), tp)
                    bar.update()
                else:
                    pieces = [value] * tp
                for model, piece in zip(models, pieces):
                    model[local] = piece
            if layout.tied and chunk.post_process and not chunk.pre_process:
                # The last stage keeps its own copy of the tied embedding as the output layer.
                for model, piece in zip(models, _split(layout, EMBEDDING, source(EMBEDDING), tp)):
                    model[_OUTPUT] = piece
            for file, model in zip(files, models):
                file[chunk.key] = model
        for tp_rank, file in enumerate(files):
            path = directory / rank_dir(tp_rank, pp_rank, pp) / CHECKPOINT_FILE
            path.parent.mkdir(parents=True)
            torch.save(file, path)
    bar.close()


class LegacyCheckpoint:
    """A legacy checkpoint directory, its rank files memory-mapped."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        ranks = {}
        for sub in self.directory.iterdir():
            match = _RANK_DIR.match(sub.name)
            if match and (sub / CHECKPOINT_FILE).is_file():
                ranks[(int(match.group(1)), int(match.group(2) or 0))] = sub / CHECKPOINT_FILE
        if not ranks:
            raise ConversionError(f"{self.directory}: no mp_rank_*/{CHECKPOINT_FILE} files")
        self.tp = max(t for t, _ in ranks) + 1
        self.pp = max(p for _, p in ranks) + 1
        grid = {(t, p) for t in range(self.tp) for p in range(self.pp)}
        check_keys((rank_dir(t, p, self.pp) for t, p in grid),
                   (rank_dir(t, p, self.pp) for t, p in ranks), f"{self.directory} (rank files)")
        self._files = {rank: torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                       for rank, path in ranks.items()}
        self._where = self._locate()
        self._layout: MegatronLayout | None = None

    @property
    def args(self):
        """The Megatron args saved with the checkpoint (None if absent)."""
        return self._files[(0, 0)].get("args")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (that of the embedding)."""
        pp_rank, key, local = self._where[EMBEDDING]
        return self._files[(0, pp_rank)][key][local].dtype

    def _chunks(self, pp_rank: int) -> list[str]:
        keys = [k for k in self._files[(0, pp_rank)] if re.fullmatch(r"model\d*", k)]
        return sorted(keys, key=lambda k: int(k[5:] or 0))

    def _locate(self) -> dict[str, tuple[int, str, str]]:
        """Global name -> (pipeline rank, chunk key, local name); chunks in layer order."""
        where, offset = {}, 0
        stages = len(self._chunks(0))
        for stage in range(stages):
            for pp_rank in range(self.pp):
                key = self._chunks(pp_rank)[stage]
                local_layers = set()
                for local in self._files[(0, pp_rank)][key]:
                    layer = layer_index(local)
                    if layer is not None:
                        local_layers.add(layer)
                    name = local if layer is None else with_layer(local, offset + layer)
                    where[name] = (pp_rank, key, local)
                offset += len(local_layers)
        return where

    def check(self, layout: MegatronLayout) -> None:
        """Strict check of parameter names (extra states and a tied output copy aside)."""
        self._layout = layout
        found = {name for name in self._where if not name.endswith("._extra_state")}
        if layout.tied:
            found.discard(_OUTPUT)
        check_keys(layout.parameters, found, f"{self.directory} (model parameters)")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The unsharded tensors of layout parameters ``names``; call :meth:`check` first."""
        layout = self._layout
        params = layout.parameters
        tensors = {}
        for name in names:
            pp_rank, key, local = self._where[name]
            pieces = [self._files[(t, pp_rank)][key][local] for t in range(self.tp)]
            param = params[name]
            if getattr(param, "tensor_model_parallel", False):
                gated = is_gated_fc1(name, layout.config.gated_linear_unit)
                tensors[name] = tp_unshard(pieces, param.partition_dim, gated)
            else:
                tensors[name] = pieces[0]
        return tensors
