"""Routed experts as two grouped GEMMs on torch's native ``grouped_mm`` (no TE, no grouped_gemm).

Megatron-Core's torch-native MoE layer runs its local experts with ``SequentialMLP``: a host
synchronisation (``tokens_per_expert.tolist()``) and two small GEMMs per expert, per layer.
:class:`GroupedGemmExperts` keeps ``SequentialMLP``'s modules, parameters and checkpoint keys
(each expert keeps its own ``linear_fc1``/``linear_fc2``, so conversion and ``torch_dist``
checkpoints are unchanged) but computes all local experts at once: the experts' weights are
stacked, the tokens (already sorted by expert) go through ``grouped_mm`` with the per-expert
offsets kept on the device, and the activation and router-probability scaling follow
``MLP.forward``'s unfused path exactly. It falls back to ``SequentialMLP`` where the grouped
kernel does not apply (one local expert, expert biases, FP8/FP4, TE activations, CUDA tensors
other than bf16, linears with forward hooks: LoRA adapters).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

try:
    from torch.nn.functional import grouped_mm
except ImportError:  # torch < 2.10 has only the private name
    grouped_mm = getattr(torch, "_grouped_mm", None)


class GroupedGemmExperts(SequentialMLP):
    """``SequentialMLP`` computed with grouped GEMMs (same parameters and checkpoints)."""

    def _grouped(self, hidden: torch.Tensor) -> bool:
        first = self.local_experts[0]
        return (grouped_mm is not None and self.num_local_experts > 1
                and not self.config.fp8 and not getattr(self.config, "fp4", None)
                and not self.config.use_te_activation_func
                and first.linear_fc1.bias is None and first.linear_fc2.bias is None
                # hooked linears (LoRA adapters) must run their own forward
                and not first.linear_fc1._forward_hooks and not first.linear_fc2._forward_hooks
                and (not hidden.is_cuda or hidden.dtype == torch.bfloat16))

    def _activation(self, hidden: torch.Tensor) -> torch.Tensor:
        config = self.config
        if not config.gated_linear_unit:
            return self.local_experts[0].activation_func(hidden)
        gate, linear = torch.chunk(hidden, 2, dim=-1)
        if (clamp := config.activation_func_clamp_value) is not None:
            gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(gate) * (linear + config.glu_linear_offset)

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        """All local experts on their (expert-sorted) tokens; returns ``(output, None)``."""
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if not self._grouped(hidden):
            return super().forward(hidden, tokens_per_expert, probs)
        dtype = hidden.dtype
        if self.config.moe_apply_probs_on_input:  # top-1 only (checked by SequentialMLP too)
            assert self.config.moe_router_topk == 1, \
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            hidden = (probs.unsqueeze(-1) * hidden).to(dtype)
            probs = torch.ones_like(probs)
        offsets = torch.cumsum(tokens_per_expert.to(hidden.device), 0).to(torch.int32)
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        intermediate = grouped_mm(hidden, fc1.transpose(1, 2), offs=offsets)
        intermediate = (self._activation(intermediate) * probs.unsqueeze(-1)).to(dtype)
        return grouped_mm(intermediate, fc2.transpose(1, 2), offs=offsets), None
