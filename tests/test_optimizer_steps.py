"""Adam's step count loads across optimizer implementations (torch per parameter, fused Adam
per group): GPU, a LLaVA checkpoint written with Transformer Engine (its FusedAdam) failed to
resume on the torch-native path with ``KeyError: 'step'``, one written without TE failed to
resume with it (``KeyError: 'bias_correction'``), and without TE the distributed optimizer
could not resume at all (tests/test_resume.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_patch.training.optimizer_steps import (
    keeps_step_per_parameter,
    start_adam_state,
    step_convention_loading,
    with_step_convention,
)


class GroupStepAdam(torch.optim.Optimizer):
    """Keeps the step in the group, like Transformer Engine's and apex's FusedAdam, and a
    hyper-parameter torch's Adam does not have."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1, "bias_correction": True})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            for p in group["params"]:
                self.state[p].setdefault("exp_avg", torch.zeros_like(p)).add_(p.grad)


class Wrapped:
    """Megatron's optimizer wrapper: the torch optimizer is ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def _trained(optimizer_class, steps=3):
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    optimizer = optimizer_class(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    return optimizer


def test_group_step_checkpoint_resumes_into_torch_adamw():
    saved = _trained(GroupStepAdam).state_dict()
    assert not keeps_step_per_parameter(GroupStepAdam([torch.nn.Parameter(torch.ones(1))]))
    with pytest.raises(KeyError, match="step"):  # what Megatron's non-distributed load does
        _trained(torch.optim.AdamW, steps=0).load_state_dict(copy.deepcopy(saved))
    fresh = _trained(torch.optim.AdamW, steps=0)
    with step_convention_loading(Wrapped(fresh)):
        fresh.load_state_dict(copy.deepcopy(saved))
    assert [float(s["step"]) for s in fresh.state.values()] == [3.0, 3.0]
    assert "load_state_dict" not in vars(fresh)  # restored afterwards


def test_torch_adamw_checkpoint_resumes_into_group_step_adam():
    saved = _trained(torch.optim.AdamW).state_dict()
    fresh = _trained(GroupStepAdam, steps=0)
    with step_convention_loading(Wrapped(fresh)):
        fresh.load_state_dict(copy.deepcopy(saved))
    assert [g["step"] for g in fresh.param_groups] == [3]
    assert all("step" not in s for s in fresh.state.values())
    assert fresh.param_groups[0]["bias_correction"] is True  # its own, not lost to the load


def test_started_adam_state_steps_like_a_fresh_adam():
    """The state given before a load is the one Adam's first step creates: same update."""
    results = []
    for start in (False, True):
        param = torch.nn.Parameter(torch.arange(4.0))
        optimizer = torch.optim.AdamW([param], lr=0.1)
        if start:
            start_adam_state(optimizer)
            assert float(optimizer.state[param]["step"]) == 0.0
        param.grad = torch.tensor([1.0, -2.0, 3.0, 0.5])
        optimizer.step()
        results.append(param.detach().clone())
    assert torch.equal(*results)


def test_loaded_group_step_reaches_every_parameter_state():
    """Megatron's distributed optimizer (torch Adam) loads the step into the groups and then
    copies its template's step back into the states: the groups' count wins, one tensor each."""
    optimizer = _trained(torch.optim.AdamW, steps=0)
    with step_convention_loading(Wrapped(optimizer)):
        for group in optimizer.param_groups:
            group["step"] = 3.0  # what the loaded groups carry
    steps = [s["step"] for s in optimizer.state.values()]
    assert [float(s) for s in steps] == [3.0, 3.0] and steps[0] is not steps[1]


def test_same_convention_is_unchanged():
    saved = _trained(torch.optim.AdamW).state_dict()
    assert with_step_convention(copy.deepcopy(saved), per_parameter=True)["state"].keys() == \
        saved["state"].keys()
    group_saved = _trained(GroupStepAdam).state_dict()
    converted = with_step_convention(copy.deepcopy(group_saved), per_parameter=False)
    assert converted["param_groups"][0]["step"] == 3
