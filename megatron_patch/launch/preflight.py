"""Checks of a launch's inputs before torchrun starts: data, tokenizer and checkpoint paths.

Each problem is one line naming the path and the fix; the launcher prints them and stops (with
``DRY_RUN=1`` they are notes, since a printed command may be meant for another machine).
"""

from __future__ import annotations

from pathlib import Path

from megatron_patch.launch.settings import NO_CHECKPOINT, NO_PATH, SHIPPED_DATA, RunSettings
from megatron_patch.utils.metadata import TRACKER_FILE


def _prefixes(blend: str) -> list[str]:
    """The dataset paths of a blend (``"0.3 /data/a 0.7 /data/b"``), weights left out."""
    paths = []
    for word in blend.split():
        try:
            float(word)
        except ValueError:
            paths.append(word)
    return paths


def _data_problem(path: str, flag: str, mode: str) -> str | None:
    indexed = Path(path + ".bin").is_file() and Path(path + ".idx").is_file()
    if mode == "finetune":  # chat files, a directory of them, or preprocess-sft output
        if Path(path).exists() or next(Path(path).parent.glob(Path(path).name + "_*.bin"), None):
            return None
        return (f"{flag} {path}: no such file or dataset; give chat data (JSONL/JSON/parquet) "
                "or the --output-prefix of `megatron-patch preprocess-sft`")
    if indexed:
        return None
    hint = (f" ({path} is a file: preprocess it first)" if Path(path).is_file() else "")
    return (f"{flag} {path}: no indexed dataset {path}.bin/.idx{hint}; make one with "
            "`megatron-patch preprocess --input FILE --output-prefix PREFIX` and pass "
            "PREFIX_text_document")


def input_problems(mode: str, settings: RunSettings, tokenizer_path: str | None) -> list[str]:
    """One line per missing input of the launch: data, validation data, tokenizer, checkpoint."""
    problems = []
    if settings.dataset_path != SHIPPED_DATA:
        problems += [_data_problem(p, "--data-path", mode)
                     for p in _prefixes(settings.dataset_path)]
    if settings.valid_dataset_path != NO_PATH:
        problems += [_data_problem(p, "--valid-data-path", mode)
                     for p in _prefixes(settings.valid_dataset_path)]
    load = settings.pretrain_checkpoint_path
    if tokenizer_path and tokenizer_path != load and not Path(tokenizer_path).exists():
        problems.append(f"tokenizer {tokenizer_path}: no such directory; set TOKENIZER_PATH to "
                        "the model's HF tokenizer directory")
    if load != NO_CHECKPOINT and not Path(load).is_dir():
        problems.append(f"--load {load}: no such checkpoint directory; convert an HF model with "
                        "`megatron-patch convert hf-to-mcore --hf-dir DIR --out CKPT`")
    elif load != NO_CHECKPOINT and not (Path(load) / TRACKER_FILE).is_file():
        problems.append(f"--load {load}: not a Megatron checkpoint (no {TRACKER_FILE}); convert "
                        "an HF model with `megatron-patch convert hf-to-mcore`")
    return [problem for problem in problems if problem]


def finished_iteration(save_dir: Path, train_iters: int) -> int | None:
    """The iteration of ``save_dir``'s latest checkpoint if it reached ``train_iters``."""
    tracker = save_dir / TRACKER_FILE
    text = tracker.read_text().strip() if tracker.is_file() else ""
    if text.isdigit() and int(text) >= train_iters:
        return int(text)
    return None
