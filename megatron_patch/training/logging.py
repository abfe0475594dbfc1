"""Training logs in Megatron-LM's own line format, plus TensorBoard scalars."""

from __future__ import annotations

import argparse
from datetime import datetime

import torch


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_rank_last(message: str) -> None:
    """Print once, from the last rank (the one holding the loss in pipeline runs)."""
    if _is_last_rank():
        print(message, flush=True)


class TrainingLogger:
    """Accumulates per-iteration numbers and prints every ``--log-interval`` iterations."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.interval = max(1, args.log_interval)
        self.writer = None
        if args.tensorboard_dir and _is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir,
                                        max_queue=args.tensorboard_queue_size)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.seconds = 0.0
        self.flops = 0.0
        self.skipped = 0
        self.nans = 0

    def step(self, iteration: int, losses: dict[str, float], seconds: float, flops: float,
             update_ok: bool, grad_norm: float | None, loss_scale: float, lr: float) -> None:
        """Record one iteration; print and write TensorBoard on log intervals."""
        self.count += 1
        self.seconds += seconds
        self.flops += flops
        self.skipped += int(not update_ok)
        for key, value in losses.items():
            if value != value or value in (float("inf"), float("-inf")):
                self.nans += 1
            self.sums[key] = self.sums.get(key, 0.0) + value
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(key, value, iteration)
            self.writer.add_scalar("learning-rate", lr, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("grad-norm", grad_norm, iteration)
        if iteration % self.interval == 0:
            self._print(iteration, grad_norm, loss_scale, lr)
            self._reset()

    def _print(self, iteration: int, grad_norm: float | None, loss_scale: float,
               lr: float) -> None:
        args = self.args
        per_iter = self.seconds / self.count
        world = torch.distributed.get_world_size()
        tokens_per_s = args.global_batch_size * args.seq_length / per_iter
        tflops = self.flops / self.seconds / world / 1e12
        line = f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"
        line += f" iteration {iteration:8d}/{args.train_iters:8d} |"
        line += f" consumed samples: {args.consumed_train_samples:12d} |"
        line += f" elapsed time per iteration (ms): {per_iter * 1000.0:.1f} |"
        line += f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f} |"
        line += f" tokens per second: {tokens_per_s:.1f} |"
        line += f" learning rate: {lr:.6E} |"
        line += f" global batch size: {args.global_batch_size:5d} |"
        for key, total in self.sums.items():
            line += f" {key}: {total / self.count:.6E} |"
        line += f" loss scale: {loss_scale:.1f} |"
        if grad_norm is not None:
            line += f" grad norm: {grad_norm:.3f} |"
        line += f" number of skipped iterations: {self.skipped:3d} |"
        line += f" number of nan iterations: {self.nans:3d} |"
        print_rank_last(line)
        if self.writer is not None:
            self.writer.add_scalar("throughput/tokens-per-second", tokens_per_s, iteration)

    def validation(self, iteration: int, losses: dict[str, float]) -> None:
        """Print a Megatron-style validation line."""
        if not losses:
            return
        parts = " | ".join(
            f"{k} value: {v:.6E} | {k} PPL: {torch.exp(torch.tensor(min(v, 20.0))).item():.6E}"
            for k, v in losses.items()
        )
        bar = "-" * (len(parts) + 40)
        print_rank_last(f"{bar}\n validation loss at iteration {iteration} | {parts} |\n{bar}")
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(f"{key} validation", value, iteration)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


