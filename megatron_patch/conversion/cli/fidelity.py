"""The ``--layers`` and ``--train-steps`` modes of ``megatron-patch verify``.

    megatron-patch verify --hf-dir H --mcore-dir M --layers [--tp N --pp N ...]
    megatron-patch verify --hf-dir H --mcore-dir M --train-steps 20 [--precision fp32|bf16]
        [--lr 1e-3] [--train-tolerance T] [--plot curves.png]

``--layers`` prints max-abs / relative error per layer input, attention output, MLP output,
final norm and logits and exits 1 if a point's relative error is over ``--tolerance``, naming
the first one. ``--train-steps`` trains both sides and exits 1 if a step's loss or gradient
norm differs by more than ``--train-tolerance`` (relative).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_fidelity_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of both modes."""
    parser.add_argument("--layers", action="store_true",
                        help="per-layer activation table; --tolerance is relative per point")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train N AdamW steps on both sides and compare loss/grad norm")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training precision (auto: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--train-tolerance", type=float, default=None,
                        help="largest relative loss / grad-norm gap per step "
                             "(default 1e-4 fp32, 2e-2 bf16)")
    parser.add_argument("--plot", default=None, help="write the two loss curves to this PNG")


def check_fidelity_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations the modes cannot run (ValueError naming the flags)."""
    from megatron_patch.conversion.verify.training import Hyper

    if args.layers and args.train_steps:
        raise ValueError("give --layers or --train-steps, not both")
    if 0 < args.train_steps <= Hyper.warmup_steps:
        raise ValueError(f"--train-steps {args.train_steps}: give more than the "
                         f"{Hyper.warmup_steps} warm-up steps")


def training_precision(args: argparse.Namespace) -> str:
    """The precision ``--train-steps`` trains in: ``--precision``, auto = bf16 on a GPU."""
    if args.precision != "auto":
        return args.precision
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def compares_in_fp32(args: argparse.Namespace) -> bool:
    """Whether this run compares fp32 numbers (logits, layers, fp32 training), which TF32
    GEMMs would spoil; bf16 training is compared at its own looser tolerance."""
    return not (args.train_steps and training_precision(args) == "bf16")


def run_fidelity(args: argparse.Namespace) -> int | None:
    """Run the requested mode on every rank; None when neither flag is given."""
    if not (args.layers or args.train_steps):
        return None
    import torch

    rank0 = int(os.environ.get("RANK", "0")) == 0
    layout = dict(tp=args.tp, pp=args.pp, ep=getattr(args, "ep", 1),
                  etp=getattr(args, "etp", None), batch_size=args.batch_size,
                  seq_length=args.seq_length)
    if args.layers:
        from megatron_patch.conversion.verify.layers import compare_layers, first_over, format_table

        errors = compare_layers(args.hf_dir, args.mcore_dir, **layout)
        torch.distributed.destroy_process_group()
        if rank0:
            print(format_table(errors, args.tolerance), flush=True)
        return 0 if first_over(errors, args.tolerance) is None else 1

    from megatron_patch.conversion.verify.training import TOLERANCE, Hyper, compare_training

    precision = training_precision(args)
    tolerance = TOLERANCE[precision] if args.train_tolerance is None else args.train_tolerance
    curves = compare_training(args.hf_dir, args.mcore_dir, steps=args.train_steps,
                              hyper=Hyper(lr=args.lr, min_lr=args.lr / 10),
                              bf16=precision == "bf16", **layout)
    torch.distributed.destroy_process_group()
    if rank0:
        print(f"{args.train_steps} training steps ({precision}, tp={args.tp}, pp={args.pp}):")
        print(curves.table(tolerance), flush=True)
        if args.plot:
            gap = max(abs(a - b) for a, b in zip(curves.megatron_loss, curves.hf_loss))
            title = (f"loss: megatron (tp={args.tp}, pp={args.pp}) vs HF, {precision}, "
                     f"max gap {gap:.2e}")
            plot_curves(args.plot, {"megatron": curves.megatron_loss, "HF": curves.hf_loss},
                        title)
            print(f"wrote {args.plot}")
    return 0 if curves.ok(tolerance) else 1


def plot_curves(path: str | Path, curves: dict[str, list[float]], title: str) -> None:
    """Overlay loss curves (step on x) in a PNG written atomically (needs Pillow)."""
    from PIL import Image, ImageDraw

    width, height, margin = 900, 500, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = [v for curve in curves.values() for v in curve]
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    steps = max(len(curve) for curve in curves.values())

    def xy(step: int, value: float) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * step / max(1, steps - 1)
        return x, height - margin - (height - 2 * margin) * (value - low) / (high - low)

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, 20), title, fill="black")
    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        draw.text((5, xy(0, value)[1] - 6), f"{value:.3f}", fill="black")
    draw.text((width - margin - 40, height - margin + 10), f"step {steps}", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (name, curve) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        draw.line([xy(s, v) for s, v in enumerate(curve)], fill=colour, width=2 if i else 3)
        draw.text((width - margin - 120, margin + 10 + 16 * i), f"- {name}", fill=colour)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
