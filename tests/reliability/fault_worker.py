"""torchrun worker: the pretrain entry point with faults injected (env ``FAULT=kind:N[,kind:N]``).

``python -m torch.distributed.run ... -m tests.reliability.fault_worker [pretrain flags]``. It
also prints every logged loss exactly (``exact N <float.hex>``, ``exact-valid N <float.hex>``)
so that runs can be compared bit for bit.

* ``staged:N`` - the whole job (launcher and every rank) is SIGKILLed once the checkpoint of
  iteration N is fully written to the staging directory, before it is published.
* ``published:N`` - SIGKILL after ``iter_N`` was renamed into the save directory, before the
  tracker names it.
* ``disk_full:N`` - every write of the checkpoint of iteration N fails with ENOSPC ("No space
  left on device"), raised where Megatron-Core writes each tensor.
* ``nan_loss:N`` - rank 0's loss is NaN in iteration N (so are its gradients).
* ``inf_grad:N`` - gradients are infinite in iteration N, the loss stays finite.
"""

import errno
import functools
import os
import signal
import sys

import psutil
import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_patch.arguments import parse_training_args
from megatron_patch.training import checkpoint
from megatron_patch.training.logging import TrainingLogger
from megatron_patch.training.loop import gpt_forward_step
from megatron_patch.training.pretrain import run_training
from megatron_patch.training.pretrain_data import build_pretrain_datasets

FAULTS = {kind: int(at) for kind, _, at in (fault.partition(":") for fault in
                                            os.environ.get("FAULT", "").split(",") if fault)}


def kill_job() -> None:
    """SIGKILL the launcher and all its processes at once, as when a node dies."""
    launcher = psutil.Process(os.getppid())
    for process in [launcher, *launcher.children(recursive=True)]:
        if process.pid != os.getpid():
            process.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _publish(staging, save_dir, iteration):
    if FAULTS.get("staged") == iteration:
        kill_job()
    return original_publish(staging, save_dir, iteration)


def _write_text(path, text):
    if path.name == checkpoint.TRACKER_FILE and text == str(FAULTS.get("published")):
        kill_job()
    return original_write_text(path, text)


def _save(iteration, *args, **kwargs):
    global disk_full
    disk_full = FAULTS.get("disk_full") == iteration
    return original_save(iteration, *args, **kwargs)


@functools.wraps(filesystem_async._write_item)
def _write_item(*args, **kwargs):
    if disk_full:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original_write_item(*args, **kwargs)


disk_full = False
calls = 0


def forward_step(data_iterator, model):
    """``gpt_forward_step`` with the loss or its gradient poisoned in the chosen iterations."""
    global calls
    output, loss_func = gpt_forward_step(data_iterator, model)
    if not torch.is_grad_enabled():  # evaluation
        return output, loss_func
    calls += 1
    iteration = (calls - 1) // get_num_microbatches() + 1
    if FAULTS.get("nan_loss") == iteration and torch.distributed.get_rank() == 0:
        output = output * float("nan")
    if FAULTS.get("inf_grad") == iteration and output.requires_grad:
        output.register_hook(lambda grad: grad * float("inf"))
    return output, loss_func


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _step(self, iteration, losses, *args, **kwargs):
    if losses and _is_last_rank():
        print(f"exact {iteration} {losses['lm loss'].hex()}", flush=True)
    return original_step(self, iteration, losses, *args, **kwargs)


def _validation(self, iteration, losses):
    if losses and _is_last_rank():
        print(f"exact-valid {iteration} {losses['lm loss'].hex()}", flush=True)
    return original_validation(self, iteration, losses)


original_step, TrainingLogger.step = TrainingLogger.step, _step
original_validation, TrainingLogger.validation = TrainingLogger.validation, _validation
original_publish, checkpoint._publish = checkpoint._publish, _publish
original_write_text, checkpoint.atomic_write_text = checkpoint.atomic_write_text, _write_text
original_save, checkpoint.save_checkpoint = checkpoint.save_checkpoint, _save
original_write_item, filesystem_async._write_item = filesystem_async._write_item, _write_item

if __name__ == "__main__":
    run_training(parse_training_args(sys.argv[1:]), build_pretrain_datasets, forward_step)
