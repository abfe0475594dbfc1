"""Grouped-GEMM experts equal Megatron-Core's SequentialMLP: outputs and every weight gradient."""

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.models.common import grouped_experts

pytestmark = pytest.mark.skipif(grouped_experts.grouped_mm is None,
                                reason="this torch has no grouped_mm")


def _experts(cls, gated: bool, probs_on_input: bool):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=32, ffn_hidden_size=48, moe_ffn_hidden_size=48,
        num_attention_heads=4, num_moe_experts=4, moe_router_topk=1 if probs_on_input else 2,
        moe_apply_probs_on_input=probs_on_input, moe_router_pre_softmax=probs_on_input,
        gated_linear_unit=gated,
        activation_func=F.silu if gated else F.gelu, bias_activation_fusion=False,
        add_bias_linear=False, use_cpu_initialization=True)
    torch.manual_seed(0)
    return cls(4, config, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                   linear_fc2=RowParallelLinear),
               pg_collection=get_default_pg_collection())


@pytest.mark.parametrize("gated,probs_on_input", [(True, False), (False, False), (True, True)])
def test_grouped_experts_match_sequential(model_parallel, gated, probs_on_input):
    from megatron.core.transformer.moe.experts import SequentialMLP

    sequential = _experts(SequentialMLP, gated, probs_on_input)
    grouped = _experts(grouped_experts.GroupedGemmExperts, gated, probs_on_input)
    grouped.load_state_dict(sequential.state_dict())
    assert set(grouped.state_dict()) == set(sequential.state_dict())
    tokens_per_expert = torch.tensor([5, 0, 7, 3])  # an expert without tokens, too
    hidden = torch.randn(15, 32)
    probs = torch.rand(15)
    grad = torch.randn(15, 32)
    outputs, grads = [], []
    for experts in (sequential, grouped):
        x = hidden.clone().requires_grad_()
        out, bias = experts(x, tokens_per_expert, probs)
        assert bias is None
        out.backward(grad)
        outputs.append(out.detach())
        grads.append([x.grad, *(p.grad for p in experts.parameters())])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    assert len(grads[0]) == len(grads[1]) == 1 + 2 * 4
    for mine, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


def test_grouped_experts_fall_back_for_one_local_expert(model_parallel):
    experts = _experts(grouped_experts.GroupedGemmExperts, True, False)
    experts.num_local_experts = 1  # e.g. EP equal to the expert count
    assert not experts._grouped(torch.zeros(1, 32))
