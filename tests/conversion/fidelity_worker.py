"""torchrun worker: ``verify --layers`` tables and ``--train-steps`` curves in one process group.

``python -m torch.distributed.run --nproc-per-node N -m tests.conversion.fidelity_worker JOBS OUT``
reads a JSON list of jobs ``{"id", "kind": "layers"|"train", "hf", "mcore", "tp", "pp"[, "ep",
"steps"]}`` and writes ``{id: result}`` (from rank 0) to OUT: the per-point errors of a layers
job as ``[layer, point, max_abs, rel]`` rows, the four curves of a training job.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

from megatron_patch.conversion.verify.layers import compare_layers
from megatron_patch.conversion.verify.training import compare_training

SEQ = 16


def main(jobs_file: str, out_file: str) -> None:
    results = {}
    for job in json.loads(Path(jobs_file).read_text()):
        layout = {"tp": job["tp"], "pp": job["pp"], "ep": job.get("ep", 1), "seq_length": SEQ}
        if job["kind"] == "layers":
            results[job["id"]] = [[e.layer, e.point, e.max_abs, e.rel]
                                  for e in compare_layers(job["hf"], job["mcore"], **layout)]
        else:
            curves = compare_training(job["hf"], job["mcore"], steps=job["steps"], **layout)
            results[job["id"]] = dataclasses.asdict(curves)
    if torch.distributed.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
