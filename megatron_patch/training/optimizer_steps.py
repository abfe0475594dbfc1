"""Adam's step count across optimizer implementations, on checkpoint load.

torch's ``Adam``/``AdamW`` keep the step count in every parameter's state; Transformer Engine's
and apex's ``FusedAdam`` keep it in the parameter group. Megatron's distributed optimizer
converts between the two when it loads; its non-distributed mixed-precision optimizer does not,
so a checkpoint written where Transformer Engine is installed failed to resume on the
torch-native path (``KeyError: 'step'`` in ``AdamW.__setstate__``), and the other way round
Adam's bias correction would start again at step 1.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_patch.utils.instance_attributes import instance_attributes


def keeps_step_per_parameter(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps the step count in each parameter's state (torch's own)."""
    return type(optimizer).__module__.startswith("torch.optim")


def with_step_convention(state_dict: dict, per_parameter: bool) -> dict:
    """``state_dict`` (a torch optimizer's) with its step count where the loader keeps it."""
    groups, states = state_dict.get("param_groups", []), state_dict.get("state", {})
    if per_parameter:
        step = next((g["step"] for g in groups if g.get("params") and "step" in g), None)
        if step is not None:
            for state in states.values():
                if state and "step" not in state:
                    state["step"] = torch.tensor(float(step), dtype=torch.float32)
        return state_dict
    steps = {int(s.pop("step")) for s in states.values() if "step" in s}
    if steps:
        for group in groups:
            group.setdefault("step", max(steps))
    return state_dict


def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    inner = (getattr(o, "optimizer", None) for o in chained)
    return [o for o in inner if isinstance(o, torch.optim.Optimizer)]


def _loading_either_convention(optimizer: torch.optim.Optimizer):
    """``optimizer.load_state_dict`` converting the step count to its own convention first."""
    load, per_parameter = optimizer.load_state_dict, keeps_step_per_parameter(optimizer)
    return lambda state_dict: load(with_step_convention(state_dict, per_parameter))


def step_convention_loading(optimizer) -> contextlib.AbstractContextManager[None]:
    """While active, the torch optimizers inside Megatron's ``optimizer`` (None: none) load
    state dicts of either step convention."""
    inner = _inner_optimizers(optimizer) if optimizer is not None else []
    return instance_attributes((o, "load_state_dict", _loading_either_convention(o))
                               for o in inner)
