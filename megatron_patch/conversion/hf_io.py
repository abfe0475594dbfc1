"""Hugging Face safetensors checkpoints, read and written one tensor at a time.

:class:`HFCheckpoint` maps a shard (``safe_open``) only while reading one tensor from it, so the
process holds the tensors it reads and no shard pages. :class:`ShardedSafetensorsWriter` holds at
most one shard of tensors before writing it, and names shards the way ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``bf16``/``bfloat16``/``fp16``/``fp32``... (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The name HF ``config.json`` uses for ``dtype`` (``bfloat16``, ``float32``, ...)."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or an int."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"cannot read size {size!r} (use e.g. 5GB, 500MB)")
    number, unit, suffix = match.groups()
    base = 1024 if suffix and suffix.upper() == "IB" else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


class HFCheckpoint:
    """Tensor-by-tensor reader of an HF model directory's safetensors weights."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.hf_dir / file for name, file in weight_map.items()}
        elif (self.hf_dir / SINGLE_FILE).is_file():
            single = self.hf_dir / SINGLE_FILE
            with safe_open(str(single), framework="pt") as handle:
                self._files = dict.fromkeys(handle.keys(), single)
        else:
            raise FileNotFoundError(
                f"{self.hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints "
                "are read (re-save others with save_pretrained(..., safe_serialization=True))"
            )

    @property
    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self._files)

    def _open(self, name: str):
        if name not in self._files:
            raise KeyError(f"{self.hf_dir}: no tensor {name!r}")
        return safe_open(str(self._files[name]), framework="pt")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (the shard is mapped only while reading it)."""
        with self._open(name) as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        with self._open(name) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype without reading it."""
        with self._open(name) as handle:
            code = handle.get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.hf_dir}: {name!r} has dtype {code}, not a float format")
        return _SAFETENSORS_DTYPES[code]


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards plus the index."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes the current shard first if ``tensor`` would overflow it."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total += size

    def _flush(self) -> None:
        save_file(self._pending, str(self._part(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.out_dir / f".shard-{index}.safetensors.partial"

    def finish(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        if count == 1:
            self._part(0).rename(self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for index, names in enumerate(self._shards):
            file = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            self._part(index).rename(self.out_dir / file)
            weight_map.update(dict.fromkeys(names, file))
            files.append(file)
        index_json = {"metadata": {"total_size": self._total},
                      "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")
        return files
