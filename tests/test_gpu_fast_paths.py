"""The torch-native replacements for apex kernels agree with Megatron-Core's own fallbacks."""

import torch
from megatron.core import utils as mcore_utils
from megatron.core.optimizer import clip_grads, optimizer

from megatron_patch.runtime.cpu_compat import apply_cpu_compat
from megatron_patch.runtime.gpu_fast_paths import foreach_l2_norm, foreach_scale, use_fused_adam


def _tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in [(7, 3), (11,), (2, 5, 4)]]


def test_patched_megatron_symbols_exist():
    for module, name in [(clip_grads, "l2_norm_impl"), (clip_grads, "multi_tensor_scale_impl"),
                         (optimizer, "multi_tensor_scale_impl")]:
        assert hasattr(module, name), f"{module.__name__}.{name} is gone: update gpu_fast_paths"


def test_l2_norm_matches_megatron_fallback():
    apply_cpu_compat()
    tensors = _tensors(0)
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = foreach_l2_norm(0, flag, [tensors], False)
    theirs, _ = mcore_utils.local_multi_tensor_l2_norm(0, flag, [tensors], False)
    # Megatron's fallback returns its norm on the GPU when there is one.
    torch.testing.assert_close(ours, theirs.reshape(1).cpu(), rtol=1e-6, atol=0)
    empty, _ = foreach_l2_norm(0, flag, [[]], False)
    assert empty.item() == 0.0


def test_scale_matches_megatron_fallback_in_place_and_copy():
    flag = torch.zeros(1, dtype=torch.int)
    sources = _tensors(1)
    ours = [torch.zeros_like(t) for t in sources]
    theirs = [torch.zeros_like(t) for t in sources]
    foreach_scale(0, flag, [sources, ours], 0.25)
    mcore_utils.local_multi_tensor_scale(0, flag, [sources, theirs], 0.25)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    in_place = [t.clone() for t in sources]
    foreach_scale(0, flag, [in_place, in_place], 0.5)
    for a, b in zip(in_place, sources):
        assert torch.equal(a, b * 0.5)


def test_fused_adam_only_switches_cuda_groups():
    params = [torch.nn.Parameter(t) for t in _tensors(3)]
    adam = torch.optim.AdamW(params)
    assert use_fused_adam(adam) == 0
    assert not adam.param_groups[0]["fused"]



def test_prefer_cudnn_attention_reorders_sdpa_backends():
    from torch.nn.attention import SDPBackend

    from megatron_patch.runtime.gpu_fast_paths import prefer_cudnn_attention

    previous = prefer_cudnn_attention()
    try:
        order = list(torch._C._get_sdp_priority_order())
        assert order[0] == int(SDPBackend.CUDNN_ATTENTION)
        assert sorted(order) == sorted(previous)
        assert [b for b in order[1:]] == [b for b in previous if b != order[0]]
    finally:
        torch._C._set_sdp_priority_order(previous)
