"""The small pieces: spike rule, tracker parsing, atomic files and directories (in-process)."""

import os

import pytest

from megatron_patch.training.checkpoint import CheckpointError, read_tracker
from megatron_patch.training.resilience import SpikeDetector
from megatron_patch.utils import files


def test_spike_rule_follows_megatron():
    detector = SpikeDetector(factor=10, warmup=3)
    assert not any(detector.is_spike(loss) for loss in (1.0, 2.0, 1.5))  # the reference: 2.0
    assert not detector.is_spike(19.9)
    assert detector.is_spike(20.0)
    assert not detector.is_spike(float("nan"))


@pytest.mark.parametrize("text, expected", [("release", "release"), (" 120\n", 120)])
def test_tracker_values(tmp_path, text, expected):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(text)
    assert read_tracker(tmp_path) == expected


def test_tracker_absent_or_corrupt(tmp_path):
    assert read_tracker(tmp_path) is None
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("")
    with pytest.raises(CheckpointError, match="found ''; the tracker file is corrupt"):
        read_tracker(tmp_path)


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "tracker.txt"
    files.atomic_write_text(target, "4")
    assert target.read_text() == "4"

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_text(target, "6")
    assert target.read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracker.txt"]


def test_atomic_directory_fsyncs_everything_before_the_rename(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "fsync_path", lambda path: synced.append(str(path)))
    out = tmp_path / "out"
    with files.atomic_directory(out) as scratch:
        (scratch / "sub").mkdir()
        (scratch / "sub" / "a.bin").write_bytes(b"a")
        (scratch / "b.json").write_text("{}")
    assert sorted(p.name for p in out.rglob("*")) == ["a.bin", "b.json", "sub"]
    written = {os.path.relpath(path, scratch) for path in synced[:-1]}
    assert written == {"sub/a.bin", "sub", "b.json", "."}  # files, then their directories
    assert synced[-1] == str(tmp_path)  # the rename itself
    with pytest.raises(RuntimeError), files.atomic_directory(tmp_path / "failed") as scratch:
        (scratch / "partial.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
