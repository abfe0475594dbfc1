"""Every issue-9 family pretrains from its converted tiny checkpoint with a falling loss.

One torchrun launch of 2 gloo processes runs them all through the pretrain entry point
(``--load`` of the converted release checkpoint, mock data) with tensor and sequence
parallelism (so ALiBi slopes per shard, the extra norms' gradients, the NormHead and the
one-key/value-head models' attention train under TP).
"""

import json

import pytest

from tests.launch import run_module

TRAIN = ["--dataset", "mock", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "5", "--log-interval", "1",
         "--eval-iters", "0", "--seed", "7", "--lr", "1e-3", "--min-lr", "1e-3",
         "--attention-dropout", "0", "--hidden-dropout", "0"]
# glm and baichuan (7B) are the Megatron models of chatglm and llama: not trained twice.
CONVERTED = ["bloom", "falcon_mqa", "falcon_gqa", "starcoder_mqa", "starcoder2", "glm4",
             "galactica"]
DERIVED = ["chatglm", "baichuan2", "baichuan_alibi"]
LAYOUT = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


@pytest.mark.distributed
def test_families_train_from_converted_checkpoints(converted, derived, tmp_path):
    checkpoints = {**{case: converted[case] for case in CONVERTED},
                   **{name: derived[name][2] for name in DERIVED}}
    runs = [{"id": case, "argv": TRAIN + ["--load", str(path)] + LAYOUT}
            for case, path in checkpoints.items()]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    run_module("tests.conversion.training_worker",
               [str(tmp_path / "runs.json"), str(tmp_path / "losses.json")], nproc=2)
    results = json.loads((tmp_path / "losses.json").read_text())
    print("\nlm loss per iteration:\n" + "\n".join(
        f"  {case:16s} " + " ".join(f"{loss:.3f}" for loss in found.values())
        for case, found in results.items()))
    for case in checkpoints:
        found = [results[case][str(i)] for i in range(1, 6)]
        assert max(found[-2:]) < found[0] - 0.05, (case, found)
