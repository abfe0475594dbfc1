"""Mixture-of-experts router losses for the training log (Megatron-LM's ``track_moe_metrics``).

Megatron-Core's routers record their load-balancing (and z-) losses per layer in the MoE metrics
tracker during the forward pass; :func:`moe_router_losses` reduces them over pipeline and data
parallel ranks once per iteration, averages them over the MoE layers and micro-batches, and
clears the tracker - the numbers Megatron-LM prints as ``load_balancing_loss``.
"""

from __future__ import annotations

import argparse

from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

# --moe-router-load-balancing-type -> the name its loss is tracked under
_TRACKED = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
            "global_aux_loss": "global_load_balancing_loss"}


def moe_router_losses(args: argparse.Namespace, iteration: int) -> dict[str, float]:
    """This iteration's router losses (empty for dense models); call it on every rank."""
    if not args.num_experts:
        return {}
    kinds = args.moe_router_load_balancing_type
    names = [_TRACKED[kind] for kind in (kinds if isinstance(kinds, list) else [kinds])
             if kind in _TRACKED]
    if args.moe_z_loss_coeff is not None:
        names.append("z_loss")
    if not names:
        return {}
    reported: dict = {}
    get_moe_metrics_tracker().report(
        loss_scale=1 / get_num_microbatches(), iteration=iteration, force_initialize=True,
        track_names=names, num_layers=args.num_layers, moe_layer_freq=args.moe_layer_freq,
        mtp_num_layers=args.mtp_num_layers, total_loss_dict=reported)
    return {name: float(value) for name, value in reported.items()}
