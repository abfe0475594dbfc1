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
from collections.abc import Iterator

import torch


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


@contextlib.contextmanager
def step_convention_loading(optimizer) -> Iterator[None]:
    """While active, the torch optimizers inside Megatron's ``optimizer`` (None: none) load
    state dicts of either step convention."""
    inner = _inner_optimizers(optimizer) if optimizer is not None else []
    for torch_optimizer in inner:
        load, per_parameter = torch_optimizer.load_state_dict, \
            keeps_step_per_parameter(torch_optimizer)
        torch_optimizer.load_state_dict = (
            lambda state_dict, _load=load, _per=per_parameter:
            _load(with_step_convention(state_dict, _per)))
    try:
        yield
    finally:
        for torch_optimizer in inner:
            del torch_optimizer.load_state_dict
