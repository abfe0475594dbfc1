"""The CPU compatibility layer: every upstream symbol it patches still exists and still needs it."""

import inspect

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only layer")


@pytest.fixture(scope="module", autouse=True)
def compat():
    from megatron_patch.runtime.cpu_compat import apply_cpu_compat

    assert apply_cpu_compat()


def test_targets_megatron_core_0_19():
    import megatron.core

    assert megatron.core.__version__.startswith("0.19."), megatron.core.__version__


def test_patched_upstream_symbols_exist():
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.training import arguments, utils
    from megatron.training.utils import common_utils

    for module, name in [(mcore_random, "_get_cuda_rng_state"),
                         (mcore_random, "_set_cuda_rng_state"),
                         (arguments, "get_device_arch_version"),
                         (utils, "get_device_arch_version"),
                         (common_utils, "get_device_arch_version")]:
        assert hasattr(module, name), f"{module.__name__}.{name} is gone: update cpu_compat"


def test_rotary_embedding_still_targets_cuda_and_lands_on_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    assert "current_device" in inspect.getsource(RotaryEmbedding.__init__)
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0)
    assert rope.inv_freq.device.type == "cpu"
    assert rope(8).shape == (8, 1, 1, 16)


def test_cuda_device_requests_and_type_names():
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().to("cuda:0").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"


def test_rng_tracker_forks_on_the_cpu_generator(model_parallel):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(7)
    outside_before = torch.rand(3)
    torch.manual_seed(7)
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.rand(3), outside_before), "fork must restore the outer state"
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tracker.fork():
        assert torch.equal(torch.rand(3), first), "same seed, same forked stream"


def test_streams_and_synchronize_are_inert():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.synchronize()
    event = torch.cuda.Event()
    event.record()


def test_moe_alltoall_dispatcher_still_needs_its_patches():
    """The alltoall dispatcher still synchronises on a recorded event and hands the split sizes
    from ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` to ``all_to_all_single``."""
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_patch.runtime.cpu_compat import _cpu_split_sizes

    source = inspect.getsource(token_dispatcher.MoEAlltoAllTokenDispatcher)
    assert "record_event()" in source and "as_numpy=True" in source
    # It makes a CUDA stream when it is built (so every MoE model build, conversion included).
    assert "torch.cuda.Stream()" in inspect.getsource(
        token_dispatcher.MoEAlltoAllTokenDispatcher.__init__)
    assert token_dispatcher.maybe_move_tensor_to_cpu is _cpu_split_sizes
    assert torch.cuda.Stream().record_event().synchronize() is None
    assert _cpu_split_sizes(torch.tensor([1, 2]), as_numpy=True).tolist() == [1, 2]
