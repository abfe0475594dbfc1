"""Keeping a long run alive and honest: exit signals, non-finite values, loss spikes.

* ``--exit-signal-handler`` (Megatron-LM): the ``--exit-signal`` (SIGTERM by default) is caught
  from start-up on (DataLoader workers and the checkpoint writer's helper process ignore it);
  at the end of the current iteration every rank learns of it (one all-gather), a final
  checkpoint is saved (with ``--save``) and training returns.
* ``--check-for-nan-in-loss-and-grad`` (Megatron-LM, on by default): after each backward pass,
  before the optimizer step, the loss and the gradients are checked on every rank and the ranks
  agree in one all-gather. ``--on-nonfinite stop`` (default) raises :class:`NonFiniteError` with
  the iteration and the ranks, like Megatron-LM; ``--on-nonfinite skip`` skips that iteration's
  update (as Megatron's fp16 loss scaler does on overflow), logs it and trains on. With
  ``--fp16`` only the loss is checked: overflowing gradients are the loss scaler's business.
* ``--check-for-spiky-loss`` (Megatron-LM's rule): an iteration loss at least 10x the largest
  of the first 100 is logged as a warning with its iteration.
"""

from __future__ import annotations

import argparse
import signal
from datetime import datetime

import torch
from megatron.training.dist_signal_handler import DistributedSignalHandler

SPIKE_FACTOR = 10.0  # Megatron's is_unexpectedly_large threshold for the loss
SPIKE_WARMUP = 100  # iterations whose largest loss is the reference, as in Megatron

_signal_handler: DistributedSignalHandler | None = None


class NonFiniteError(RuntimeError):
    """A NaN or infinite loss or gradient stopped training (``--on-nonfinite stop``)."""


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


def _start_checkpoint_writer_queue(exit_signal: int) -> None:
    """Start Megatron-Core's checkpoint write-results queue now, immune to the exit signal.

    The queue lives in a multiprocessing Manager process that megatron-core 0.19 otherwise
    starts at the first save (``filesystem_async.get_write_results_queue``). torchrun and job
    schedulers signal a rank's whole process group, which would kill that process in the middle
    of the final save; started with the signal ignored (inherited), it survives.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = signal.signal(exit_signal, signal.SIG_IGN)
    try:
        filesystem_async.get_write_results_queue()
    finally:
        signal.signal(exit_signal, previous)


def install_exit_signal_handler(args: argparse.Namespace) -> None:
    """Catch ``--exit-signal`` from now on when ``--exit-signal-handler`` is given."""
    global _signal_handler
    if args.exit_signal_handler and _signal_handler is None:
        if args.save:
            _start_checkpoint_writer_queue(args.exit_signal)
        _signal_handler = DistributedSignalHandler(args.exit_signal).__enter__()


def exit_signal_received() -> bool:
    """Whether any rank caught the exit signal (collective: call on every rank)."""
    return _signal_handler is not None and any(_signal_handler.signals_received())


def ignore_in_workers(exit_signal: int, _worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the exit signal, so that one sent to the
    whole job (as schedulers do) leaves them serving the final iteration and checkpoint."""
    signal.signal(exit_signal, signal.SIG_IGN)


def exit_signal_name(args: argparse.Namespace) -> str:
    """The exit signal's name, e.g. ``SIGTERM``."""
    return signal.Signals(args.exit_signal).name


def disable_ddp_nan_check(model: list[torch.nn.Module]) -> None:
    """Leave the NaN check to :func:`nonfinite_ranks` (which knows the iteration and can skip).

    Megatron-Core's DDP raises on a NaN gradient inside the backward pass, on the one rank
    that sees it, before the others can agree to stop or skip.
    """
    for chunk in model:
        config = getattr(chunk, "ddp_config", None)
        if config is not None:
            config.check_for_nan_in_grad = False


def _gradient_sum(model: list[torch.nn.Module]) -> torch.Tensor:
    """Sum of every local gradient: finite exactly when all of them are (barring overflow)."""
    sums = []
    for chunk in model:
        buffers = getattr(chunk, "buffers", None)
        if buffers is not None:
            sums += [buffer.grad_data.sum(dtype=torch.float32)
                     for buffer in [*buffers, *chunk.expert_parallel_buffers]]
        else:
            sums += [getattr(p, "main_grad", p.grad).sum(dtype=torch.float32)
                     for p in chunk.parameters()
                     if getattr(p, "main_grad", p.grad) is not None]
    return torch.stack(sums).sum() if sums else torch.zeros(())


def nonfinite_ranks(model: list[torch.nn.Module], losses: list[dict],
                    check_grads: bool) -> dict[str, list[int]]:
    """Ranks holding a non-finite loss / gradient this iteration (collective, every rank).

    ``losses`` are this rank's per-micro-batch loss dicts (empty off the last pipeline stage).
    Returns ``{"loss": [ranks], "gradients": [ranks]}`` for the kinds found; empty when clean.
    """
    loss_bad = any(not torch.isfinite(value).all() for entry in losses for value in entry.values())
    grad_bad = check_grads and not torch.isfinite(_gradient_sum(model)).item()
    flags = torch.tensor([int(loss_bad), int(grad_bad)], dtype=torch.int32,
                         device="cuda" if torch.cuda.is_available() else "cpu")
    gathered = [torch.zeros_like(flags) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flags)
    found: dict[str, list[int]] = {}
    for index, kind in enumerate(("loss", "gradients")):
        ranks = [rank for rank, value in enumerate(gathered) if value[index].item()]
        if ranks:
            found[kind] = ranks
    return found


def handle_nonfinite(found: dict[str, list[int]], iteration: int,
                     args: argparse.Namespace) -> None:
    """Raise :class:`NonFiniteError` (``--on-nonfinite stop``) or log the skipped update."""
    what = " and ".join(f"non-finite {kind} (NaN/inf) on ranks {ranks}"
                        for kind, ranks in found.items())
    if args.on_nonfinite == "stop":
        raise NonFiniteError(f"iteration {iteration}: {what}; stopping (--on-nonfinite skip "
                             "skips such updates; the last checkpoint is unaffected)")
    if torch.distributed.get_rank() == 0:
        print(f" [{_now()}] iteration {iteration}: {what}; update skipped (--on-nonfinite skip)",
              flush=True)


class SpikeDetector:
    """Megatron's spiky-loss rule: a loss >= ``factor`` x the largest of the first ``warmup``."""

    def __init__(self, factor: float = SPIKE_FACTOR, warmup: int = SPIKE_WARMUP) -> None:
        self.factor, self.warmup = factor, warmup
        self.seen = 0
        self.reference = 0.0

    def is_spike(self, loss: float) -> bool:
        """Record ``loss``; whether it is a spike (non-finite losses are checked elsewhere)."""
        if loss != loss or abs(loss) == float("inf"):
            return False
        if self.seen < self.warmup:
            self.seen += 1
            self.reference = max(self.reference, abs(loss))
            return False
        return abs(loss) >= self.reference * self.factor

    def check(self, iteration: int, losses: dict[str, float]) -> None:
        """Warn about a spiky ``lm loss`` (called where the reduced losses are, the last stage)."""
        loss = losses.get("lm loss")
        if loss is not None and self.is_spike(loss):
            print(f" [{_now()}] WARNING: iteration {iteration}: spiky loss {loss:.6E} (>= "
                  f"{self.factor:g}x {self.reference:.6E}, the largest of the first "
                  f"{self.warmup} iterations)", flush=True)
