"""What a checkpoint directory says about itself: the small metadata file megatron-patch writes
next to a converted checkpoint, Megatron's tracker file and the arguments it saves."""

from __future__ import annotations

import argparse
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


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded; the message names the file and the reason."""


def iteration_dir(directory: str | Path, iteration: int | str) -> Path:
    """Megatron's directory of one checkpoint: ``iter_0000100`` or ``release``."""
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    return Path(directory) / name


def read_tracker(directory: str | Path) -> int | str | None:
    """The iteration (or ``"release"``) the tracker file names; None without one."""
    tracker = Path(directory) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text(errors="replace").strip()
    if text == "release":
        return text
    if text.isdigit():
        return int(text)
    raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found "
                          f"{text[:40]!r}; the tracker file is corrupt (write the iteration of a "
                          "complete iter_* checkpoint into it)")


def saved_args(load_dir: str | Path, step: int | None = None) -> argparse.Namespace | None:
    """The Megatron args saved with the ``torch_dist`` checkpoint of ``load_dir`` that its
    tracker (or ``step``) names; None where there is none."""
    from megatron.core import dist_checkpointing

    latest = read_tracker(load_dir)
    if latest is None:
        return None
    directory = iteration_dir(load_dir, latest if step is None else step)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        return None
    return dist_checkpointing.load_common_state_dict(str(directory)).get("args")
