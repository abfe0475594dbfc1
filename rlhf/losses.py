"""Loss functions of preference and policy-gradient training, on per-sequence/per-token tensors.

Pure tensor functions (no parallel state): the entry points gather the log-probabilities and
call these on the last pipeline stage, where the logits are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor | None, reference_rejected: torch.Tensor | None, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards ``beta * (log pi - log pi_ref)`` of both answers.

    Inputs are summed log-probabilities of each answer [pairs]. ``reference_*`` None is
    reference-free DPO (a reference that gives every answer the same probability).
    ``sigmoid`` (Rafailov et al. 2023) with ``label_smoothing`` eps is the conservative DPO of
    Mitchell (2023): ``-(1-eps) log s(beta h) - eps log s(-beta h)``; ``ipo`` (Azar et al. 2023)
    is ``(h - 1/(2 beta))^2`` with ``h`` the difference of log-ratios (averaged per token
    when the caller passes mean log-probabilities, as the IPO paper does).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"DPO loss type {loss_type!r}; use one of {DPO_LOSSES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - (0 if reference_chosen is None else reference_chosen)
    rejected_ratio = policy_rejected - (0 if reference_rejected is None else reference_rejected)
    logits = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair reward-model loss ``-log sigmoid(r_chosen - r_rejected)``."""
    return -F.logsigmoid(chosen - rejected)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, over the group's std when ``scale``.

    ``rewards`` [groups * group_size], the completions of one prompt consecutive. The std is
    the sample std (unbiased), as DeepSeekMath's GRPO and TRL use.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size).float()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def kl_k3(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k3, >= 0)."""
    delta = reference_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                        advantages: torch.Tensor, clip_low: float, clip_high: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (to minimise) and where the clip was active.

    The ratio is clipped to ``[1 - clip_low, 1 + clip_high]`` (equal bounds: PPO/GRPO; a higher
    upper bound: DAPO). ``advantages`` broadcast against the token tensors ([rows, 1] for
    sequence advantages).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the tokens of each row [rows, tokens].

    ``values`` are the critic's estimates at each token, ``mask`` marks the response tokens (a
    contiguous span per row); the value after a row's last token is 0. Returns advantages and
    returns (advantages + values), 0 outside the mask.
    """
    mask = mask.float()
    advantages = torch.zeros_like(values, dtype=torch.float32)
    running = torch.zeros(values.shape[0], dtype=torch.float32, device=values.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token and where the clipped term was the larger.

    ``0.5 * max((v - R)^2, (v_old + clamp(v - v_old, -clip, clip) - R)^2)``: the critic gains
    nothing from moving a value more than ``clip`` away from the rollout's estimate.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped_error, clipped_error), \
        (clipped_error > unclipped_error).float()


def ppo_token_rewards(scores: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards [rows, tokens]: ``-kl_coef * log_ratio`` on the response tokens
    (``log pi - log pi_ref`` of the sampled tokens), plus each row's sequence reward ``scores``
    [rows] at its last response token; 0 outside ``mask``."""
    mask = mask.float()
    rewards = -kl_coef * log_ratio.float() * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.float() * mask[rows, last]
    return rewards
