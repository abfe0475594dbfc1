"""Fixtures shared by the in-process Megatron-Core tests."""

import pytest
import torch


@pytest.fixture
def model_parallel(tmp_path):
    """A one-process group (gloo, or nccl with CUDA) with Megatron's parallel state on it."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_patch.runtime.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"file://{tmp_path}/store",
                                         rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
