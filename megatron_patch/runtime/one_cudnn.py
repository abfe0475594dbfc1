"""One cuDNN per process: Transformer Engine loads the cuDNN library torch already loaded.

Transformer Engine looks for cuDNN in the CUDA toolkit (``/usr/local/cuda``) before the
``nvidia-cudnn`` wheel torch uses. Where the two differ (a CUDA image with its own cuDNN beside
torch's wheel), the process holds two cuDNN versions that share sub-library names, and the
first TE fused attention after torch used cuDNN (an HF reference forward in ``verify
--train-steps``) fails with ``CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED``. Pointing TE's own search
(``CUDNN_HOME``) at torch's copy before TE is imported keeps one. A ``CUDNN_HOME`` or
``CUDNN_PATH`` the user set wins.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

LOG = logging.getLogger(__name__)
USER_CHOICES = ("CUDNN_HOME", "CUDNN_PATH")  # what Transformer Engine reads first, in order


def loaded_cudnn_directory(memory_maps: str) -> str | None:
    """The directory of the ``libcudnn.so*`` mapped into a process (``/proc/<pid>/maps`` text)."""
    for line in memory_maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset device inode path
        if len(fields) == 6 and Path(fields[5]).name.startswith("libcudnn.so"):
            return str(Path(fields[5]).parent)
    return None


def cudnn_home_for_transformer_engine(memory_maps: str,
                                      environ: MutableMapping[str, str]) -> str | None:
    """Where TE should look for cuDNN so it shares torch's copy; None to leave TE's own search."""
    if any(environ.get(name) for name in USER_CHOICES):
        return None
    return loaded_cudnn_directory(memory_maps)


def share_torch_cudnn_with_transformer_engine() -> None:
    """Before TE is imported, point its cuDNN search at the copy torch loaded (Linux)."""
    if "transformer_engine" in sys.modules or not importlib.util.find_spec("transformer_engine"):
        return
    import torch

    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.version()  # makes sure torch's cuDNN is loaded into this process
    try:
        memory_maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    directory = cudnn_home_for_transformer_engine(memory_maps, os.environ)
    if directory is not None:
        os.environ["CUDNN_HOME"] = directory
        LOG.info("Transformer Engine uses torch's cuDNN in %s (CUDNN_HOME chooses another)",
                 directory)
