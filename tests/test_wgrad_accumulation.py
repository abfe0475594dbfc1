"""Megatron-Core's gradient-accumulation fusion on torch (no apex): the weight gradients that land
in the data-parallel gradient buffer agree with an fp64 reference, as the unfused path's do."""

import functools

import pytest
import torch

from megatron_patch.runtime.gpu_fast_paths import TorchWgradAccumulation, install_wgrad_accumulation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _wrapped_linears(fused: bool, dtype: torch.dtype):
    """Column- then row-parallel linear in Megatron's DDP (fp32 gradient buffer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=24, num_attention_heads=4, use_cpu_initialization=True,
        gradient_accumulation_fusion=fused, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    torch.manual_seed(0)
    init = functools.partial(torch.nn.init.normal_, std=0.2)
    module = torch.nn.Sequential(
        ColumnParallelLinear(24, 40, config=config, init_method=init, bias=False,
                             gather_output=True),
        RowParallelLinear(40, 24, config=config, init_method=init, bias=True,
                          input_is_parallel=False, skip_bias_add=False))
    module.to(DEVICE)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    return ddp, module


def _inputs(dtype: torch.dtype, micro_batches: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 24, generator=generator).to(DEVICE, dtype)
            for _ in range(micro_batches)]


def _loss(output: torch.Tensor) -> torch.Tensor:
    return (output.double() ** 2).sum()


def _main_grads(fused: bool, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The fp32 gradient buffer after two micro-batches, and an fp64 reference gradient."""
    ddp, module = _wrapped_linears(fused, dtype)
    ddp.zero_grad_buffer()
    for hidden in _inputs(dtype):
        _loss(module[1](module[0](hidden)[0])[0]).backward()
    ddp.finish_grad_sync()
    weights = [p.detach().double().requires_grad_() for p in module.parameters()]
    for hidden in _inputs(dtype):
        column, row, bias = weights
        _loss((hidden.double() @ column.t()) @ row.t() + bias).backward()
    return [p.main_grad.clone() for p in module.parameters()], [w.grad for w in weights]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_wgrad_lands_in_the_gradient_buffer(model_parallel, monkeypatch, dtype):
    if not torch.cuda.is_available():  # the fused backward allocates on current_device()
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    assert install_wgrad_accumulation(force=True)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 activations are rounded
    for fused in (False, True):
        grads, reference = _main_grads(fused, dtype)
        assert all(g.dtype == torch.float32 for g in grads)
        for grad, expected in zip(grads, reference):
            scale = expected.abs().max().item()
            assert scale > 0
            error = (grad.double() - expected).abs().max().item()
            assert error <= tolerance * scale, (fused, error, scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed-precision addmm needs CUDA")
def test_mixed_precision_accumulation_on_cuda():
    generator = torch.Generator(device="cuda").manual_seed(0)
    inputs = torch.randn(512, 256, device="cuda", generator=generator).bfloat16()
    grads = torch.randn(512, 384, device="cuda", generator=generator).bfloat16()
    main_grad = torch.randn(384, 256, device="cuda", generator=generator)
    expected = main_grad + grads.float().t() @ inputs.float()
    TorchWgradAccumulation.wgrad_gemm_accum_fp32(inputs, grads, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-4, atol=1e-3)


def test_compiled_layers_keep_fused_linears_out_of_the_graph(model_parallel, monkeypatch):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_patch.runtime.float8 import convert_linears_to_float8
    from megatron_patch.runtime.gpu_fast_paths import compile_transformer_layers

    assert install_wgrad_accumulation(force=True)
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # the wrapping, not the compiler
    linears = {}
    for fused, float8 in [(True, False), (False, False), (True, True)]:
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                   use_cpu_initialization=True,
                                   gradient_accumulation_fusion=fused)
        layer = TransformerLayer(config, get_gpt_layer_local_spec().submodules)
        if float8:
            assert convert_linears_to_float8(layer, emulate=True) == 4
        compile_transformer_layers(layer)
        linears[fused, float8] = [m for n, m in layer.named_modules() if n.endswith(
            ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))]
    assert all(len(found) == 4 for found in linears.values())
    outside = {key: [getattr(m._forward_impl, "_torchdynamo_disable", False) for m in found]
               for key, found in linears.items()}
    assert outside == {(True, False): [True] * 4, (False, False): [False] * 4,
                       (True, True): [False] * 4}


def test_compiled_layers_run_packed_batches_eagerly(monkeypatch):
    """Packed (THD) batches change their sequence boundaries every step: compiled, each would
    recompile (GPU: the SFT packing demo made no iteration in 214 s); they run eagerly."""
    from megatron_patch.runtime import gpu_fast_paths

    calls = []

    class Layer(torch.nn.Module):
        def forward(self, hidden_states, packed_seq_params=None):
            calls.append("eager")
            return hidden_states

    def compile_(forward):
        def compiled(*args, **kwargs):
            calls.append("compiled")
            return forward(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", compile_)
    from megatron.core.transformer import transformer_layer

    monkeypatch.setattr(transformer_layer, "TransformerLayer", Layer)
    layer = Layer()
    assert gpu_fast_paths.compile_transformer_layers(layer) == 1
    x = torch.zeros(2)
    layer(hidden_states=x)
    assert calls == ["compiled", "eager"]
    calls.clear()
    layer(hidden_states=x, packed_seq_params=object())
    assert calls == ["eager"]


def test_compiled_layers_run_a_mixture_of_experts_mlp_eagerly(monkeypatch):
    """GPU: Megatron's MoE token dispatcher calls ``record_stream`` inside the layer, which
    torch.compile cannot functionalize (MoE training failed at its first step); the MoE MLP
    runs eagerly, the rest of the layer stays compiled."""
    from megatron.core.transformer import transformer_layer
    from megatron.core.transformer.moe import moe_layer

    from megatron_patch.runtime import gpu_fast_paths

    compiling = {}

    class MLP(torch.nn.Module):
        def forward(self, hidden_states):
            compiling[type(self).__name__] = torch.compiler.is_compiling()
            return hidden_states * 2

    class MoE(MLP):
        pass

    class Layer(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, hidden_states, packed_seq_params=None):
            compiling["layer"] = torch.compiler.is_compiling()
            return self.mlp(hidden_states + 1)

    monkeypatch.setattr(transformer_layer, "TransformerLayer", Layer)
    monkeypatch.setattr(moe_layer, "MoELayer", MoE)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = torch.nn.Sequential(Layer(MLP()), Layer(MoE()))
    assert gpu_fast_paths.compile_transformer_layers(model) == 2
    torch._dynamo.reset()
    assert torch.equal(model(torch.ones(3)), torch.full((3,), 10.0))
    assert compiling == {"layer": True, "MLP": True, "MoE": False}
