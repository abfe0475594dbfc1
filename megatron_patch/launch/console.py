"""What the terminal shows of a training run; the run's log file gets every line.

Megatron's iteration, validation and checkpoint lines, our own lines, warnings and errors are
shown; the argument dump, Megatron's INFO logging, the gradient-bucket listing and library
notices the user cannot act on (Python warnings of the libraries) go to the log file only.
"""

from __future__ import annotations

import re

from megatron_patch.runtime.backends import Backends

_ARGUMENTS = ("------------------------ arguments ------------------------",
              "-------------------- end of arguments ---------------------")
_LOG_ONLY = re.compile(
    r"^(INFO:megatron\.|WARNING:megatron\.core\.rerun_state_machine:"
    r"|WARNING:megatron\.core\.dist_checkpointing\.strategies\.torch:MCore's async save"
    r"|\t|Params for bucket |using world size: |Number of virtual stages per pipeline"
    r"|using torch\.\w+ for parameters)")
# A Python warning raised in library code (Megatron, torch): the line, then its source line.
_LIBRARY_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning: ")


class ConsoleFilter:
    """Decides line by line whether the terminal shows a line of the run's output."""

    def __init__(self) -> None:
        self._in_arguments = False
        self._source_line_next = False

    def shows(self, line: str) -> bool:
        """Whether ``line`` (with or without its newline) goes to the terminal."""
        text = line.rstrip("\n")
        if self._in_arguments:
            self._in_arguments = text.strip() != _ARGUMENTS[1]
            return False
        if text.strip() == _ARGUMENTS[0]:
            self._in_arguments = True
            return False
        if self._source_line_next:
            self._source_line_next = False
            if text.startswith("  "):
                return False
        if _LIBRARY_WARNING.match(text):
            self._source_line_next = True
            return False
        return not _LOG_ONLY.match(text)


def backends_line(backends: Backends) -> str:
    """One line naming the devices and the fast-path libraries this run uses."""
    device = f"{backends.gpu_count} CUDA GPU(s), nccl" if backends.cuda else "CPU, gloo"
    found = {"Transformer Engine": backends.transformer_engine, "apex": backends.apex,
             "flash-attn": backends.flash_attn}
    used = [name for name, ok in found.items() if ok]
    missing = [name for name, ok in found.items() if not ok]
    text = f"backends: {device}; " + (f"using {', '.join(used)}" if used else "")
    if missing:
        text += ("; " if used else "") + f"torch-native layers in place of {', '.join(missing)}"
    return text
