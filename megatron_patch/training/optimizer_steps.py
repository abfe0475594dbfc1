"""Adam's step count across optimizer implementations, on checkpoint load.

torch's ``Adam``/``AdamW`` keep the step count in every parameter's state; Transformer Engine's
and apex's ``FusedAdam`` keep it in the parameter group. Megatron's distributed optimizer
converts between the two when it loads; its non-distributed mixed-precision optimizer does not,
so a checkpoint written where Transformer Engine is installed failed to resume on the
torch-native path (``KeyError: 'step'`` in ``AdamW.__setstate__``), and the other way round
Adam's bias correction would start again at step 1.

Two more things break a resume across (or without) Transformer Engine, fixed while loading:
a loaded parameter group replaces the optimizer's own, so hyper-parameters only one
implementation has (FusedAdam's ``bias_correction``) went missing (``KeyError`` at the next
step); and without TE or apex, Megatron's distributed optimizer reads the step count from the
per-parameter states of torch's Adam while it prepares the load, which a never-stepped Adam
does not have yet (``AssertionError`` in ``DistributedOptimizer.state_dict``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_patch.utils.instance_attributes import instance_attributes


def keeps_step_per_parameter(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps the step count in each parameter's state (torch's own)."""
    return type(optimizer).__module__.startswith("torch.optim")


def with_step_convention(state_dict: dict, per_parameter: bool) -> dict:
    """``state_dict`` (a torch optimizer's) with its step count where the loader keeps it."""
    groups, states = state_dict.get("param_groups", []), state_dict.get("state", {})
    if per_parameter:  # one tensor per parameter: Adam increments each in place, and
        # Megatron's distributed optimizer loads a single tensor into every state
        step = next((g["step"] for g in groups if g.get("params") and "step" in g), None)
        for state in states.values():
            value = state.get("step", step) if state else None
            if value is not None:
                state["step"] = torch.tensor(float(value), dtype=torch.float32)
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
    """``optimizer.load_state_dict`` converting the step count to its own convention first and
    keeping the optimizer's own hyper-parameters the loaded groups lack."""
    load, per_parameter = optimizer.load_state_dict, keeps_step_per_parameter(optimizer)

    def loading(state_dict: dict) -> None:
        load(with_step_convention(state_dict, per_parameter))
        for group in optimizer.param_groups:
            for key, value in optimizer.defaults.items():
                group.setdefault(key, value)

    return loading


def _step_tensor(value: float, group: dict, param: torch.Tensor) -> torch.Tensor:
    """A step count as torch's Adam keeps it (on the parameter's device for fused kernels)."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(value), dtype=torch.float32,
                        device=param.device if on_device else "cpu")


def _take_group_steps(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's step count from its (loaded) group's, where the group has one."""
    for group in optimizer.param_groups:
        if group.get("step") is None:
            continue
        for param in group["params"]:
            if optimizer.state.get(param):
                optimizer.state[param]["step"] = _step_tensor(group["step"], group, param)


def start_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a never-stepped torch Adam the state its first step creates (step 0, zero moments),
    which it behaves the same with; other optimizers and stepped ones are left as they are."""
    if optimizer.state or not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {
                "step": _step_tensor(0, group, param),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
            if group.get("amsgrad"):
                optimizer.state[param]["max_exp_avg_sq"] = torch.zeros_like(param)


@contextlib.contextmanager
def step_convention_loading(optimizer) -> Iterator[None]:
    """While active, the torch optimizers inside Megatron's ``optimizer`` (None: none) load
    state dicts of either step convention, written with or without Transformer Engine (a
    never-stepped torch Adam gets its first state on entry: :func:`start_adam_state`).

    On exit, a torch Adam whose loaded parameter groups carry the step count takes it into
    every parameter's state: Megatron's distributed optimizer keeps the step out of its
    parameter state and, after loading the groups, copies back the step its load template
    held, which restarted Adam's bias correction at step 0 on resume.
    """
    inner = _inner_optimizers(optimizer) if optimizer is not None else []
    for torch_optimizer in inner:
        start_adam_state(torch_optimizer)
    with instance_attributes((o, "load_state_dict", _loading_either_convention(o))
                             for o in inner):
        yield
    for torch_optimizer in inner:
        if keeps_step_per_parameter(torch_optimizer):
            _take_group_steps(torch_optimizer)
