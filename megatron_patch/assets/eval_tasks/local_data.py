"""Loads a shipped demo task's JSONL files from this directory (lm-eval's ``custom_dataset``).

lm-eval reads a YAML's relative ``data_files`` from the working directory; these tasks name
their files relative to this directory instead, so they run from anywhere.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata):
    """``datasets.load_dataset("json")`` of ``data_files`` (split -> file in this directory)."""
    import datasets

    return datasets.load_dataset("json", data_files={split: str(HERE / name)
                                                     for split, name in data_files.items()})
