"""Megatron's legacy ``torch`` checkpoint format: one ``model_optim_rng.pt`` per TP/PP rank.

``release/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt`` holds that rank's model
chunk(s) (``model``, or ``model0``, ``model1``, ... with virtual pipeline stages) under local
parameter names; with expert parallelism (EP > 1) each file holds the routed experts of its EP
rank, numbered locally. Unlike ``torch_dist`` the layout is baked in: train at the TP/PP/VPP/EP
it was written with. Names are those of the torch-native layer spec (Transformer Engine names its
layers differently); experts are split over the tensor-parallel ranks (expert TP = TP).
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
    expert_index,
    layer_index,
    with_expert,
    with_layer,
)
from megatron_patch.utils.sharding import is_gated_fc1, tp_shard, tp_unshard

CHECKPOINT_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})((?:_\d{3}){0,2})$")
_OUTPUT = "output_layer.weight"


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron's per-rank directory name."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


def _local_name(name: str, chunk: Chunk, ep_rank: int = 0, local_experts: int = 0
                ) -> str | None:
    """``name`` inside ``chunk`` on expert-parallel rank ``ep_rank`` (layer and expert
    renumbered), or None if that rank's chunk does not hold it."""
    expert = expert_index(name)
    if expert is not None:
        if expert // local_experts != ep_rank:
            return None
        name = with_expert(name, expert % local_experts)
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
                common: dict, chunks: list[Chunk], tp: int, progress: bool = True,
                ep: int = 1) -> None:
    """Write every rank's file, one pipeline rank at a time (peak memory: one stage)."""
    state = layout.model.state_dict(keep_vars=True)  # parameters and (None) extra states
    params = layout.parameters
    pp = max(chunk.pp_rank for chunk in chunks) + 1
    local_experts = (layout.config.num_moe_experts or 0) // ep
    bar = tqdm(total=len(params), desc="writing legacy", unit="param", disable=not progress)
    for pp_rank in range(pp):
        files = {(t, e): dict(common) for t in range(tp) for e in range(ep)}
        for chunk in (c for c in chunks if c.pp_rank == pp_rank):
            models: dict[tuple[int, int], dict] = {rank: {} for rank in files}
            for name, value in state.items():
                held = {ep_rank: local for ep_rank in range(ep)
                        if (local := _local_name(name, chunk, ep_rank, local_experts))}
                if not held:
                    continue
                if name in params:
                    pieces = _split(layout, name, source(name), tp)
                    bar.update()
                else:
                    pieces = [value] * tp
                for ep_rank, local in held.items():
                    for tp_rank, piece in enumerate(pieces):
                        models[(tp_rank, ep_rank)][local] = piece
            if layout.tied and chunk.post_process and not chunk.pre_process:
                # The last stage keeps its own copy of the tied embedding as the output layer.
                pieces = _split(layout, EMBEDDING, source(EMBEDDING), tp)
                for (tp_rank, _), model in models.items():
                    model[_OUTPUT] = pieces[tp_rank]
            for rank, model in models.items():
                files[rank][chunk.key] = model
        for (tp_rank, ep_rank), file in files.items():
            path = directory / rank_dir(tp_rank, pp_rank, pp, ep_rank, ep) / CHECKPOINT_FILE
            path.parent.mkdir(parents=True)
            torch.save(file, path)
    bar.close()


class LegacyCheckpoint:
    """A legacy checkpoint directory, its rank files memory-mapped."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        found = {}
        for sub in self.directory.iterdir():
            match = _RANK_DIR.match(sub.name)
            if match and (sub / CHECKPOINT_FILE).is_file():
                suffix = [int(part) for part in match.group(2).split("_")[1:]]
                found[(int(match.group(1)), *suffix)] = sub / CHECKPOINT_FILE
        if not found:
            raise ConversionError(f"{self.directory}: no mp_rank_*/{CHECKPOINT_FILE} files")
        loaded = {key: torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                  for key, path in found.items()}
        args = next(iter(loaded.values())).get("args")
        # One 3-digit suffix is the pipeline rank, or the expert rank of an EP-only layout.
        expert_only = (getattr(args, "expert_model_parallel_size", 1) or 1) > 1 and \
            (getattr(args, "pipeline_model_parallel_size", 1) or 1) == 1

        def rank(key: tuple[int, ...]) -> tuple[int, int, int]:
            if len(key) == 2:
                return (key[0], 0, key[1]) if expert_only else (key[0], key[1], 0)
            return (*key, 0, 0)[:3]

        self._files = {rank(key): state for key, state in loaded.items()}
        self.tp, self.pp, self.ep = (max(r[i] for r in self._files) + 1 for i in range(3))
        grid = {(t, p, e) for t in range(self.tp) for p in range(self.pp) for e in range(self.ep)}
        check_keys((rank_dir(t, p, self.pp, e, self.ep) for t, p, e in grid),
                   (rank_dir(t, p, self.pp, e, self.ep) for t, p, e in self._files),
                   f"{self.directory} (rank files)")
        self._where = self._locate()
        self._layout: MegatronLayout | None = None

    @property
    def args(self):
        """The Megatron args saved with the checkpoint (None if absent)."""
        return self._files[(0, 0, 0)].get("args")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (that of the embedding)."""
        pp_rank, ep_rank, key, local = self._where[EMBEDDING]
        return self._files[(0, pp_rank, ep_rank)][key][local].dtype

    def _chunks(self, pp_rank: int) -> list[str]:
        keys = [k for k in self._files[(0, pp_rank, 0)] if re.fullmatch(r"model\d*", k)]
        return sorted(keys, key=lambda k: int(k[5:] or 0))

    def _locate(self) -> dict[str, tuple[int, int, str, str]]:
        """Global name -> (pipeline rank, expert rank, chunk key, local name); chunks in layer
        order, experts numbered globally."""
        where, offset = {}, 0
        stages = len(self._chunks(0))
        for stage in range(stages):
            for pp_rank in range(self.pp):
                key = self._chunks(pp_rank)[stage]
                local_layers = set()
                for ep_rank in range(self.ep):
                    model = self._files[(0, pp_rank, ep_rank)][key]
                    local_experts = 1 + max((expert_index(n) for n in model
                                             if expert_index(n) is not None), default=-1)
                    for local in model:
                        expert, layer = expert_index(local), layer_index(local)
                        if expert is None and ep_rank > 0:
                            continue  # replicated over expert ranks: read rank 0's copy
                        if layer is not None:
                            local_layers.add(layer)
                        name = local if layer is None else with_layer(local, offset + layer)
                        if expert is not None:
                            name = with_expert(name, ep_rank * local_experts + expert)
                        where[name] = (pp_rank, ep_rank, key, local)
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
            pp_rank, ep_rank, key, local = self._where[name]
            pieces = [self._files[(t, pp_rank, ep_rank)][key][local] for t in range(self.tp)]
            param = params[name]
            if getattr(param, "tensor_model_parallel", False):
                gated = is_gated_fc1(name, layout.config.gated_linear_unit)
                tensors[name] = tp_unshard(pieces, param.partition_dim, gated)
            else:
                tensors[name] = pieces[0]
        return tensors
