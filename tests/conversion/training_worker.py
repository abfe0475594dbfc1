"""torchrun worker: several pretraining runs, one after another, in one process group.

``python -m torch.distributed.run --nproc-per-node N -m tests.conversion.training_worker RUNS
OUT`` reads a JSON list of ``{"id", "argv"}`` and runs the pretrain entry point
(``megatron_patch.training.pretrain.main``) with each ``argv``; rank 0 writes
``{id: {iteration: lm loss}}`` (parsed from Megatron's log lines, printed by the last rank) to
OUT. Starting every run in one launch saves a process start per run.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from megatron_patch.training import pretrain
from tests.launch import losses


def main(runs_file: str, out_file: str) -> None:
    results = {}
    for run in json.loads(Path(runs_file).read_text()):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            pretrain.main(run["argv"])
        found = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(found, losses(log.getvalue()))
        results[run["id"]] = next((f for f in found if f), {})
    if torch.distributed.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
