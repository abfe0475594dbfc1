"""The small metadata file megatron-patch writes next to a converted checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_patch.utils.files import atomic_write_text

METADATA_FILE = "megatron_patch.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron's: names the latest checkpoint


def checkpoint_metadata(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """Read ``megatron_patch.json`` from a checkpoint directory, or None if absent."""
    path = Path(checkpoint_dir) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt megatron-patch metadata ({exc})") from exc


def write_checkpoint_metadata(checkpoint_dir: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``megatron_patch.json`` atomically."""
    atomic_write_text(Path(checkpoint_dir) / METADATA_FILE,
                      json.dumps(metadata, indent=2, sort_keys=True))
